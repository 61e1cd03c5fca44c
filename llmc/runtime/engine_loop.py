"""The engine loop: one thread owns the model's Runner; front-ends (the HTTP server, `generate`)
submit requests from any thread and read each request's outputs from its RequestStream as tokens
are produced.

Commands (add, abort) reach the loop through a thread-safe inbox and are applied between steps, so
the Runner is only ever touched by the loop's thread. Each step's tokens are detokenized there (stop
strings end a request the step they complete) and handed to the streams: a plain queue for a thread
that iterates, or the consumer's asyncio event loop. Every request ends with exactly one final output
(finish_reason "stop", "length", "abort" or "error"); an exception inside a step fails the requests
of that step, releases their blocks, and the loop goes on with the others.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Protocol

from llmc.errors import ConfigError
from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.runtime.runner import Runner, RuntimeConfig, TokenEvent
from llmc.runtime.sampler import SamplingParams

IDLE_WAIT_S = 0.05                # how long the idle loop blocks on its inbox before looking again


class QueueFull(ConfigError):
    """The waiting queue holds max_queue requests: come back later."""


class Draining(ConfigError):
    """The loop takes no new requests: it is finishing the ones it has, then stopping."""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()          # the N most likely (id, logprob)


@dataclass(frozen=True)
class RequestOutput:
    """What a request produced since its previous output; the last one has a finish_reason."""
    request_id: str
    token_ids: tuple[int, ...]                        # new tokens (none in a final-only output)
    text: str                                         # new text safe to show (stop strings held back)
    finish_reason: str | None                         # "stop" | "length" | "abort" | "error" | None
    prompt_tokens: int
    completion_tokens: int                            # generated so far
    cached_tokens: int = 0                            # prompt tokens found in the prefix cache
    logprobs: tuple[TokenLogprob, ...] = ()           # one per new token, when the request asks
    stop_reason: str | None = None                    # the stop string that matched
    error: str | None = None                          # with finish_reason "error": what went wrong
    time: float = 0.0                                 # time.monotonic() when produced

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LoopObserver(Protocol):
    """Per-request timings, called on the loop's thread (the server's metrics implement it)."""
    def first_token(self, seconds: float) -> None: ...                   # time to first token
    def next_token(self, seconds: float) -> None: ...                    # inter-token latency
    def finished(self, reason: str, seconds: float) -> None: ...         # end to end


class RequestStream:
    """The outputs of one request, in order: iterate it in a thread, or `async for` it in the
    event loop it was made for. Ends after the output that has a finish_reason."""

    def __init__(self, request_id: str, prompt_ids: list[int], aio: asyncio.AbstractEventLoop | None) -> None:
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self._aio = aio
        self._q: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if aio else queue.SimpleQueue()

    def put(self, out: RequestOutput) -> None:            # the loop's thread
        if self._aio is None:
            self._q.put(out)
        else:
            try:
                self._aio.call_soon_threadsafe(self._q.put_nowait, out)
            except RuntimeError:                            # the consumer's event loop is closed
                pass

    def __iter__(self) -> Iterator[RequestOutput]:
        assert self._aio is None, "an async stream: use `async for`"
        while True:
            out = self._q.get()
            yield out
            if out.finished:
                return

    async def get(self) -> RequestOutput:
        """The next output (in the event loop the stream was made for). Cancelling the wait (a
        timeout) loses nothing: the output stays queued."""
        assert self._aio is not None, "a threaded stream: use `for`"
        return await self._q.get()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = await self.get()
            yield out
            if out.finished:
                return


@dataclass
class _Live:                        # a request the loop is serving: its stream and running state
    stream: RequestStream
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    submitted: float
    last_token: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class LoopStats:
    waiting: int                   # submitted, not yet running
    running: int
    kv_blocks_total: int
    kv_blocks_used: int            # held by live requests
    kv_blocks_cached: int          # evictable prefix-cache blocks
    prompt_tokens: int             # counters since start
    generation_tokens: int
    prefix_cache_hit_tokens: int
    preemptions: int
    steps: int
    finished: dict[str, int] = field(default_factory=dict)     # by finish reason


class EngineLoop:
    """One Runner on one thread. `submit` and `abort` may be called from any thread."""

    def __init__(self, model, runtime: RuntimeConfig = RuntimeConfig(), *, max_queue: int | None = None,
                 observer: LoopObserver | None = None) -> None:
        self.model, self.max_queue, self.observer = model, max_queue, observer
        self.runner = Runner(model, runtime)
        self.tokenizer = model.tokenizer if model.tokenizer.available else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()                  # guards _inbox_waiting, _accepting, _ids
        self._inbox_waiting = 0                         # adds sent, not yet taken by the loop
        self._accepting = True
        self._ids = itertools.count()
        self._prompt_tokens = self._generation_tokens = self._steps = 0
        self._finished: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmc-engine-loop", daemon=True)
        self.crashed: BaseException | None = None       # set if the loop itself died (a bug)

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               aio: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Queue a request; its outputs arrive on the returned stream. Raises ConfigError for a
        request that cannot run, QueueFull, or Draining."""
        self.runner.check(prompt_ids, params)
        with self._lock:
            if not self._accepting:
                raise Draining("the server is shutting down and takes no new requests")
            if self.max_queue is not None and self.num_waiting >= self.max_queue:
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")
            rid = request_id or f"req-{next(self._ids)}"
            self._inbox_waiting += 1
        stream = RequestStream(rid, list(prompt_ids), aio)
        self._inbox.put(("add", stream, params, time.monotonic()))
        return stream

    def abort(self, request_id: str) -> None:
        """End a request (if it has not ended): it gets a final output with finish_reason "abort"."""
        self._inbox.put(("abort", request_id))

    def close_intake(self) -> None:
        """Take no new requests (submit raises Draining); the ones in hand go on."""
        with self._lock:
            self._accepting = False

    def abort_all(self) -> None:
        self._inbox.put(("abort_all",))

    @property
    def num_waiting(self) -> int:
        return self._inbox_waiting + len(self.runner.scheduler.waiting)

    @property
    def idle(self) -> bool:
        """Nothing submitted is unfinished."""
        return self._inbox_waiting == 0 and not self._live

    def stats(self) -> LoopStats:
        s, a = self.runner.scheduler, self.runner.scheduler.allocator
        return LoopStats(waiting=self.num_waiting, running=len(s.running), kv_blocks_total=a.num_blocks,
                         kv_blocks_used=a.num_used, kv_blocks_cached=a.num_cached,
                         prompt_tokens=self._prompt_tokens, generation_tokens=self._generation_tokens,
                         prefix_cache_hit_tokens=s.num_prefix_hit_tokens, preemptions=s.num_preemptions,
                         steps=self._steps, finished=dict(self._finished))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left, stop the thread and wait for it."""
        self.close_intake()
        self.abort_all()
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the loop's thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_commands(block=not self.runner.has_work)
                if self.runner.has_work:
                    self._step()
            self._take_commands(block=False)
        except BaseException as e:                          # a bug in the loop: fail everyone, loudly
            self.crashed = e
            for rid in list(self._live):
                self._end(rid, "error", error=f"the engine loop stopped: {type(e).__name__}: {e}")
            raise

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, stream, params, submitted = cmd
            self._add(stream, params, submitted)
        elif kind == "abort":
            self._abort(cmd[1])
        elif kind == "abort_all":
            for rid in list(self._live):
                self._abort(rid)

    def _add(self, stream: RequestStream, params: SamplingParams, submitted: float) -> None:
        rid = stream.request_id
        try:
            if rid in self._live:
                raise ConfigError(f"request id {rid!r} is in use")
            self.runner.add(stream.prompt_ids, params, rid)
        except ConfigError as e:                         # checked at submit; the cache may have shrunk since
            with self._lock:
                self._inbox_waiting -= 1
            self._count("error")
            stream.put(RequestOutput(rid, (), "", "error", len(stream.prompt_ids), 0, error=e.one_line(),
                                     time=time.monotonic()))
            return
        detok = (IncrementalDetokenizer(self.tokenizer, stream.prompt_ids, params.stop)
                 if self.tokenizer is not None else None)
        self._live[rid] = _Live(stream, params, detok, submitted)
        with self._lock:
            self._inbox_waiting -= 1
        self._prompt_tokens += len(stream.prompt_ids)

    def _abort(self, rid: str) -> None:
        if rid in self._live:
            self.runner.finish(rid, "abort")
            self._end(rid, "abort")

    def _step(self) -> None:
        try:
            events = self.runner.step()
        except Exception as e:                              # fail this step's requests, serve the others
            failed = self.runner.in_step
            self.runner.in_step = []
            for rid in failed:
                self.runner.finish(rid, "error")
                if rid in self._live:
                    self._end(rid, "error", error=f"{type(e).__name__}: {e}")
            return
        self._steps += 1
        now = time.monotonic()
        for e in events:
            self._emit(e, now)

    def _emit(self, e: TokenEvent, now: float) -> None:
        live = self._live.get(e.request_id)
        if live is None:
            return
        reason, text, stop_reason = e.finish_reason, "", None
        if live.detok is not None and reason != "stop":     # "stop" here: an EOS / stop token, no text
            text = live.detok.add(e.token_id)
            if live.detok.stopped:
                reason, stop_reason = "stop", live.detok.stop_reason
                self.runner.finish(e.request_id, "stop")
            elif reason is not None:
                text += live.detok.flush()
        elif live.detok is not None:
            text = live.detok.flush()
        live.completion_tokens += 1
        self._generation_tokens += 1
        if live.completion_tokens == 1:
            live.cached_tokens = self._cached_tokens(e.request_id)
        if self.observer is not None:
            if live.last_token is None:
                self.observer.first_token(now - live.submitted)
            else:
                self.observer.next_token(now - live.last_token)
        live.last_token = now
        logprobs = ((TokenLogprob(e.token_id, e.logprob, e.top_logprobs),) if e.logprob is not None else ())
        out = RequestOutput(e.request_id, (e.token_id,), text, reason, len(live.stream.prompt_ids),
                            live.completion_tokens, live.cached_tokens, logprobs, stop_reason, time=now)
        if reason is not None:
            self._retire(e.request_id, reason, now)
        live.stream.put(out)

    def _cached_tokens(self, rid: str) -> int:
        req = self.runner.scheduler.requests.get(rid)
        return req.num_cached_tokens if req is not None else 0

    def _end(self, rid: str, reason: str, error: str | None = None) -> None:
        """A final output with no token: aborted or failed."""
        live = self._live[rid]
        now = time.monotonic()
        text = live.detok.flush() if live.detok is not None and reason == "abort" else ""
        self._retire(rid, reason, now)
        live.stream.put(RequestOutput(rid, (), text, reason, len(live.stream.prompt_ids), live.completion_tokens,
                                      live.cached_tokens, error=error, time=now))

    def _retire(self, rid: str, reason: str, now: float) -> None:
        live = self._live.pop(rid)
        self._count(reason)
        if self.observer is not None:
            self.observer.finished(reason, now - live.submitted)

    def _count(self, reason: str) -> None:
        self._finished[reason] = self._finished.get(reason, 0) + 1
