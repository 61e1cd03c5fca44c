"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus
/health, /ready and /metrics, over one engine loop.

Each request is checked (llmc.server.protocol), tokenized, and submitted to the loop; its outputs
come back on an async stream and are returned whole or as server-sent events (`data: {json}`
lines, then `data: [DONE]`). A client that disconnects, or a request past --request-timeout, is
aborted: its KV blocks are freed at once. A full waiting queue answers 429 with Retry-After; a
server that is draining answers 503 to new requests and on /ready.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmc.errors import ConfigError
from llmc.runtime.engine_loop import Draining, EngineLoop, QueueFull, RequestOutput, RequestStream
from llmc.server.chat import ChatTemplate, TemplateError
from llmc.server.metrics import CONTENT_TYPE, REJECT_REASONS, ServerMetrics
from llmc.server.protocol import (CHAT_FIELDS, COMPLETION_FIELDS, DEFAULT_COMPLETION_TOKENS, RequestError,
                                  messages_of, parse_request, prompts_of)

log = logging.getLogger("llmc.serve")
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    loop: EngineLoop
    model_name: str
    metrics: ServerMetrics
    chat: ChatTemplate | None = None
    api_key: str | None = None
    request_timeout: float | None = None      # seconds per request; then it is aborted
    max_body_bytes: int = 4 << 20
    draining: bool = False

    @property
    def tokenizer(self):
        return self.loop.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.loop.runner.max_model_len


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llmc", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmc = state

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        if e.code in REJECT_REASONS:
            state.metrics.rejected.labels(reason=e.code).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """/v1/*: the API key, then not while draining."""
        if request.url.path.startswith("/v1/"):
            try:
                _authorize(state, request)
                if state.draining and request.method == "POST":
                    raise RequestError("the server is shutting down", code="draining", status=503,
                                       kind="service_unavailable")
            except RequestError as e:
                return await refused(request, e)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        alive = state.loop.crashed is None
        return JSONResponse({"status": "ok" if alive else "engine loop stopped"}, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready() -> Response:
        ok = not state.draining and state.loop.crashed is None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "llmc",
             "max_model_len": state.max_model_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(await _read_json(request, state.max_body_bytes), COMPLETION_FIELDS, ("prompt",))
        _check_model(state, req.fields)
        prompts = prompts_of(req.fields["prompt"], state.loop.model.arch.vocab_size)
        encoded = [p if isinstance(p, list) else _encode(state, p) for p in prompts]
        max_tokens = req.fields.get("max_tokens", DEFAULT_COMPLETION_TOKENS)
        for ids in encoded:
            _check_length(state, ids, max_tokens)
        params = _sampling(req, max_tokens, req.fields.get("logprobs"))
        return await _respond(state, request, Completions(state, f"cmpl-{uuid.uuid4().hex}", params.logprobs),
                              encoded, params, req.stream, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(await _read_json(request, state.max_body_bytes), CHAT_FIELDS, ("messages",))
        _check_model(state, req.fields)
        messages = messages_of(req.fields["messages"])
        if state.chat is None:
            raise RequestError("this model has no chat template (tokenizer_config.json has no chat_template); "
                               "use /v1/completions, or start the server with --chat-template FILE",
                               param="messages", code="no_chat_template")
        try:
            text = state.chat.render(messages, req.fields.get("add_generation_prompt", True))
        except TemplateError as e:
            raise RequestError(e.one_line(), param="messages", code="invalid_value") from None
        ids = _encode(state, text, add_special_tokens=False)
        room = min(state.max_model_len, state.loop.runner.capacity_tokens) - len(ids)
        max_tokens = req.fields.get("max_completion_tokens", req.fields.get("max_tokens", max(room, 1)))
        _check_length(state, ids, max_tokens)
        logprobs = req.fields.get("top_logprobs", 0) if req.fields.get("logprobs") else None
        params = _sampling(req, max_tokens, logprobs)
        return await _respond(state, request, Chat(state, f"chatcmpl-{uuid.uuid4().hex}", logprobs),
                              [ids], params, req.stream, req.include_usage)

    return app


# ---- checks -------------------------------------------------------------------------------------------
def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key.encode())):
        raise RequestError("invalid or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                           status=401, headers={"WWW-Authenticate": "Bearer"})


async def _read_json(request: Request, limit: int) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(f"the request body is larger than {limit} bytes", code="body_too_large", status=413)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", code="body_too_large", status=413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None


def _check_model(state: ServerState, fields: dict) -> None:
    name = fields.get("model")
    if name is not None and name != state.model_name:
        raise RequestError(f"the model '{name}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found", status=404)


def _encode(state: ServerState, text: str, add_special_tokens: bool = True) -> list[int]:
    if not state.tokenizer.available:
        raise RequestError("this model has no tokenizer: send the prompt as token ids", param="prompt",
                           code="invalid_value")
    ids = state.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise RequestError("the prompt is empty after tokenization", param="prompt", code="invalid_value")
    return ids


def _check_length(state: ServerState, ids: list[int], max_tokens: int) -> None:
    if len(ids) + max_tokens > state.max_model_len:
        raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is more than the "
                           f"model's context of {state.max_model_len} tokens", param="max_tokens",
                           code="context_length_exceeded")


def _sampling(req, max_tokens: int, logprobs: int | None):
    try:
        return req.sampling(max_tokens, logprobs)
    except ConfigError as e:
        option = getattr(e, "option", None)
        raise RequestError(e.one_line(), param=option, code="invalid_value") from None


# ---- running a request ---------------------------------------------------------------------------------
def _submit(state: ServerState, encoded: list[list[int]], params, rid: str) -> list[RequestStream]:
    aio = asyncio.get_running_loop()
    streams: list[RequestStream] = []
    try:
        for i, ids in enumerate(encoded):
            streams.append(state.loop.submit(ids, params, request_id=rid if len(encoded) == 1 else f"{rid}-{i}",
                                             aio=aio))
    except (QueueFull, Draining, ConfigError) as e:
        for s in streams:                                     # all of the request's prompts, or none
            state.loop.abort(s.request_id)
        if isinstance(e, QueueFull):
            raise RequestError(e.one_line(), code="queue_full", status=429, kind="rate_limit_error",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if isinstance(e, Draining):
            raise RequestError(e.one_line(), code="draining", status=503, kind="service_unavailable") from None
        raise RequestError(e.one_line(), param="prompt", code="invalid_value") from None
    return streams


async def _outputs(state: ServerState, stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """The stream's outputs; past the request timeout the request is aborted (its last output then
    says "abort")."""
    deadline = None if state.request_timeout is None else time.monotonic() + state.request_timeout
    while True:
        if deadline is None:
            out = await stream.get()
        else:
            try:
                out = await asyncio.wait_for(stream.get(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                state.loop.abort(stream.request_id)
                deadline = None
                continue
        yield out
        if out.finished:
            return


async def _merged(state: ServerState, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of several streams as they come."""
    if len(streams) == 1:
        async for out in _outputs(state, streams[0]):
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        async for out in _outputs(state, s):
            await q.put((i, out))
    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out = await q.get()
            yield i, out
            remaining -= out.finished
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class _Tally:                     # per prompt: for the response, the usage and the request log
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    cached: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first: float | None = None


async def _respond(state: ServerState, request: Request, shape, encoded, params, stream: bool,
                   include_usage: bool) -> Response:
    t0 = time.monotonic()
    streams = _submit(state, encoded, params, shape.rid)
    tallies = [_Tally(prompt_tokens=len(ids)) for ids in encoded]

    def account(i: int, out: RequestOutput) -> None:
        t = tallies[i]
        t.tokens, t.cached = out.completion_tokens, out.cached_tokens
        t.text += out.text
        if t.first is None and out.token_ids:
            t.first = out.time
        if out.finished:
            t.finish_reason, t.error = out.finish_reason, out.error

    def finish_log(status: str) -> None:
        for s, t in zip(streams, tallies):
            ttft = f"{(t.first - t0) * 1e3:.0f}ms" if t.first is not None else "-"
            log.info("%s in=%d out=%d cached=%d ttft=%s total=%.0fms status=%s finish=%s", s.request_id,
                     t.prompt_tokens, t.tokens, t.cached, ttft, (time.monotonic() - t0) * 1e3,
                     "error" if t.finish_reason == "error" else status, t.finish_reason or "-")

    def abort_unfinished() -> None:
        for s, t in zip(streams, tallies):
            if t.finish_reason is None:
                state.loop.abort(s.request_id)

    if stream:
        async def events() -> AsyncIterator[str]:
            status = "ok"
            try:
                for chunk in shape.opening():
                    yield _sse(chunk)
                async for i, out in _merged(state, streams):
                    account(i, out)
                    if out.finish_reason == "error":
                        status = "error"
                        yield _sse(RequestError(f"generation failed: {out.error}", code="internal_error",
                                                status=500, kind="server_error").body())
                        continue
                    for chunk in shape.chunks(i, out):
                        yield _sse(chunk)
                if include_usage:
                    yield _sse(shape.usage_chunk(_usage(tallies)))
                yield "data: [DONE]\n\n"
            except BaseException:                         # the client went away (cancelled) or a bug
                status = "disconnected"
                abort_unfinished()
                raise
            finally:
                finish_log(status)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    watcher = asyncio.create_task(_watch_disconnect(request, abort_unfinished))
    logprobs: list[list] = [[] for _ in encoded]
    status = "ok"
    try:
        async for i, out in _merged(state, streams):
            account(i, out)
            logprobs[i] += out.logprobs
    except BaseException:
        status = "disconnected"
        abort_unfinished()
        raise
    finally:
        watcher.cancel()
        if watcher.done() and not watcher.cancelled():
            status = "disconnected"
        finish_log(status)
    failed = [t.error for t in tallies if t.finish_reason == "error"]
    if failed:
        raise RequestError(f"generation failed: {failed[0]}", code="internal_error", status=500, kind="server_error")
    return JSONResponse(shape.whole(tallies, logprobs, _usage(tallies)))


async def _watch_disconnect(request: Request, on_gone) -> None:
    while True:
        if await request.is_disconnected():
            on_gone()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _usage(tallies: list[_Tally]) -> dict[str, Any]:
    p, c = sum(t.prompt_tokens for t in tallies), sum(t.tokens for t in tallies)
    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    cached = sum(t.cached for t in tallies)
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- response shapes -------------------------------------------------------------------------------------
class Completions:
    """/v1/completions: "text_completion" objects, a choice per prompt."""

    def __init__(self, state: ServerState, rid: str, logprobs: int | None) -> None:
        self.state, self.rid, self.want_logprobs = state, rid, logprobs is not None
        self.created = int(time.time())

    def _head(self) -> dict[str, Any]:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.state.model_name}

    def _logprobs(self, lps) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        tok = self.state.tokenizer
        text = tok.token_text if tok.available else str
        tokens = [text(lp.token_id) for lp in lps]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{text(i): v for i, v in lp.top} for lp in lps], "text_offset": offsets}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        return [{**self._head(), "choices": [{"index": i, "text": out.text, "logprobs": self._logprobs(out.logprobs),
                                              "finish_reason": out.finish_reason}]}]

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(), "choices": [], "usage": usage}

    def whole(self, tallies: list[_Tally], logprobs: list[list], usage: dict) -> dict:
        return {**self._head(), "choices": [
            {"index": i, "text": t.text, "logprobs": self._logprobs(logprobs[i]), "finish_reason": t.finish_reason}
            for i, t in enumerate(tallies)], "usage": usage}


class Chat:
    """/v1/chat/completions: "chat.completion" and "chat.completion.chunk" objects."""

    def __init__(self, state: ServerState, rid: str, logprobs: int | None) -> None:
        self.state, self.rid, self.want_logprobs = state, rid, logprobs is not None
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.state.model_name}

    def _logprobs(self, lps) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        tok = self.state.tokenizer

        def entry(token_id: int, logprob: float) -> dict:
            text = tok.token_text(token_id) if tok.available else str(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in lps]}

    def opening(self) -> list[dict]:
        return [{**self._head("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}]

    def chunks(self, i: int, out: RequestOutput) -> list[dict]:
        head = self._head("chat.completion.chunk")
        chunks = []
        if out.text or out.logprobs:
            chunks.append({**head, "choices": [{"index": i, "delta": {"content": out.text},
                                                "logprobs": self._logprobs(out.logprobs), "finish_reason": None}]})
        if out.finished:
            chunks.append({**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                "finish_reason": out.finish_reason}]})
        return chunks

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}

    def whole(self, tallies: list[_Tally], logprobs: list[list], usage: dict) -> dict:
        t = tallies[0]
        return {**self._head("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": t.text},
             "logprobs": self._logprobs(logprobs[0]), "finish_reason": t.finish_reason}], "usage": usage}
