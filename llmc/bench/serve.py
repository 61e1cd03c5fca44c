"""`bench serve`: online load against any OpenAI-compatible completions endpoint (llmc serve, vLLM,
llama.cpp's llama-server, ...), at a fixed concurrency or at a Poisson request rate.

Protocol. `num_requests` prompts are made before the run: from a dataset (.txt: consecutive windows
of about `input_len` tokens, cut with the tokenizer when one is known, else on whitespace words;
.jsonl: each line's `prompt` string, in file order), both reused from the start when the file holds
fewer; or else `input_len` random token ids each (uniform over [3, vocab) minus the tokenizer's
BOS/EOS, seeded), sent as a token-id list. Every request is a streamed POST to {url}/v1/completions
asking for exactly `output_len` tokens: max_tokens = output_len, temperature 0, ignore_eos, stream,
stream_options.include_usage. Arrivals: a closed loop keeps `concurrency` requests in flight (the
default: one at a time, the latency of an unloaded server); with `request_rate` R, request i is
sent at the i-th arrival of a Poisson process (exponential gaps of mean 1/R from the seed; the
first at 0), and `concurrency`, when also given, caps the requests in flight (an arrival then waits
for a free slot). One asyncio client (httpx) sends everything; proxies from the environment apply.

Per request, on one clock (seconds from the start of the run): when it was sent, when each token
chunk arrived (a server-sent event with a choice that carries text, or no text and no
finish_reason: a pure end marker or usage-only event is not a token), when the stream ended. A
request succeeds on HTTP 200, a stream ending in `data: [DONE]`, at least one token and no error
event. Output tokens are the server's usage.completion_tokens when it sends usage, else the token
chunks counted; prompt tokens its usage.prompt_tokens, else the client's count (None without a
tokenizer). TTFT = first token - sent; e2e = end - sent; ITL = the gaps between consecutive token
chunks; TPOT = (e2e - TTFT) / (output tokens - 1), none for a single token.

Metrics, over the successful requests: mean, p50, p90, p99 of TTFT, TPOT, ITL (every gap of every
request) and e2e in ms (percentiles interpolate linearly between ranks, as numpy's default);
request and output-token throughput over the run's wall time (start to the last request's end);
goodput: the successful requests meeting every given SLO (TTFT and/or TPOT at most the limit) per
second of that wall time. The result keeps every request's raw times, so each number can be
recomputed.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from llmc.bench.launch import READY_TIMEOUT_S, launched, serve_command
from llmc.bench.prompt_ids import FIRST_PROMPT_ID, prompt_ids
from llmc.bench.result import BenchResult, Metric, exact, model_identity, sampled
from llmc.errors import ConfigError, OptionError
from llmc.io import sha256_file

DEFAULT_CONCURRENCY = 1           # neither --concurrency nor --request-rate: one request at a time

OnRequest = Callable[[int, int, "RequestSample"], None]     # (done, total, the request that finished)
OnStatus = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Options

@dataclass(frozen=True)
class SLO:
    """Service-level objectives a request must meet to count towards goodput; None: not checked."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, s: RequestSample) -> bool:
        return s.ok and (self.ttft_ms is None or s.ttft_ms <= self.ttft_ms) and \
            (self.tpot_ms is None or s.tpot_ms is None or s.tpot_ms <= self.tpot_ms)

    @property
    def given(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


def parse_slo(text: str | None) -> SLO:
    """`--slo ttft=500,tpot=50` (milliseconds; either key may be left out) -> SLO."""
    if text is None:
        return SLO()
    limits: dict[str, float] = {}
    for part in text.split(","):
        key, eq, value = (p.strip() for p in part.partition("="))
        if key not in ("ttft", "tpot") or not eq or key in limits:
            raise OptionError("slo", f"expected ttft=MS,tpot=MS (either one, each once), got {text!r}")
        try:
            limits[key] = float(value)
        except ValueError:
            raise OptionError("slo", f"{key}: expected milliseconds, got {value!r}") from None
        if not 0 < limits[key] < math.inf:
            raise OptionError("slo", f"{key}: must be a positive number of milliseconds, got {value!r}")
    return SLO(ttft_ms=limits.get("ttft"), tpot_ms=limits.get("tpot"))


def base_url(url: str) -> str:
    """The server's root URL: `http://host:port` (a trailing / or /v1 is dropped)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise OptionError("url", f"expected http://HOST:PORT, got {url!r}")
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def check_options(url, launch, dataset, tokenizer, input_len, output_len, num_requests, concurrency,
                  request_rate, seed, timeout, serve_args) -> None:
    """Every option in range before any work."""
    if (url is None) == (launch is None):
        raise OptionError("url", "give either --url URL (a running server) or --launch PATH (start `llmc "
                          "serve PATH`)" + (", not both" if url is not None else ""))
    if url is not None:
        base_url(url)
    if serve_args and launch is None:
        raise OptionError("serve_arg", "passes arguments to the server --launch starts; there is none")
    for name, value, least in (("input_len", input_len, 1), ("output_len", output_len, 1),
                               ("num_requests", num_requests, 1), ("concurrency", concurrency, 1),
                               ("seed", seed, 0)):
        if value is not None and value < least:
            raise OptionError(name, f"must be at least {least}, got {value}")
    if request_rate is not None and not request_rate > 0:          # inf: all at once
        raise OptionError("request_rate", f"must be a positive number of requests per second, got {request_rate}")
    if not 0 < timeout < math.inf:
        raise OptionError("timeout", f"must be a positive number of seconds, got {timeout}")
    for name, path in (("launch", launch), ("tokenizer", tokenizer)):
        if path is not None and not Path(path).is_dir():
            raise OptionError(name, f"{path}: no such directory")
    if dataset is not None and Path(dataset).suffix not in (".txt", ".jsonl"):
        raise OptionError("dataset", f"{dataset}: expected a .txt or a .jsonl file")


# ---------------------------------------------------------------------------------------------
# Prompts

@dataclass(frozen=True)
class Prompt:
    prompt: str | list[int]       # the `prompt` field sent
    tokens: int | None            # its length in tokens as the client counts them; None: no tokenizer


def load_tokenizer(directory: Path | str | None):
    """llmc's Tokenizer of a checkpoint or engine directory, or None."""
    if directory is None:
        return None
    from llmc.tokenizer import Tokenizer
    return Tokenizer(Path(directory))


def vocab_size(directory: Path) -> int:
    from llmc.checkpoint import read_json
    cfg = directory / "config.json"
    size = read_json(cfg, "config.json").get("vocab_size") if cfg.exists() else None
    if not isinstance(size, int) or isinstance(size, bool) or size <= FIRST_PROMPT_ID:
        raise ConfigError(f"{directory}: random prompts need the vocabulary size, and there is no usable "
                          f"vocab_size in config.json", hint="give --dataset FILE, or --tokenizer DIR of the model")
    return size


def random_prompts(tokenizer, count: int, length: int, seed: int) -> tuple[list[Prompt], str]:
    """`count` prompts of `length` token ids, uniform over [FIRST_PROMPT_ID, vocab) minus BOS/EOS."""
    if tokenizer is None:
        raise OptionError("tokenizer", "random token-id prompts need the model's vocabulary: give --tokenizer "
                          "DIR (a checkpoint with config.json), or --dataset FILE")
    allowed, drawn_from = prompt_ids(vocab_size(tokenizer.directory), tokenizer.info)
    rng = random.Random(f"{seed}/prompts")
    prompts = [Prompt(rng.choices(allowed, k=length), length) for _ in range(count)]
    return prompts, f"random token ids, {drawn_from}"


def read_text(path: Path) -> str:
    from llmc.paths import check_regular
    check_regular(path, "dataset", ConfigError)
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: the dataset cannot be read ({e})") from None


def text_windows(text: str, length: int, tokenizer) -> tuple[list[str], str]:
    """Consecutive windows of `length` tokens (words without a tokenizer); a last, shorter window
    only when it is the only one."""
    if tokenizer is not None and tokenizer.available:
        tk = tokenizer._need()
        ids = tk.encode(text.replace("\r\n", "\n"), add_special_tokens=False).ids
        cut = [ids[i:i + length] for i in range(0, len(ids), length)]
        unit, join = "tokens (the tokenizer's)", tk.decode
    else:
        words = text.split()
        cut = [words[i:i + length] for i in range(0, len(words), length)]
        unit, join = "whitespace words (no tokenizer)", " ".join
    if len(cut) > 1 and len(cut[-1]) < length:
        cut.pop()
    return [join(w) for w in cut], f"windows of {length} {unit}"


def jsonl_prompts(text: str, path: Path) -> list[str]:
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            prompt = None
        if not isinstance(prompt, str):
            raise ConfigError(f"{path}:{i + 1}: each line must be a JSON object with a string 'prompt' field")
        out.append(prompt)
    return out


def dataset_prompts(path: Path, count: int, length: int, tokenizer) -> tuple[list[Prompt], str]:
    """The dataset's prompts, reused from the start when it holds fewer than `count`."""
    text = read_text(path)
    if path.suffix == ".jsonl":
        texts, how = jsonl_prompts(text, path), "each line's prompt, in file order"
    else:
        texts, how = text_windows(text, length, tokenizer)
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError(f"{path}: the dataset holds no prompt")
    counted = tokenizer is not None and tokenizer.available
    prompts = [Prompt(t, len(tokenizer.encode(t)) if counted else None) for t in texts]
    return [prompts[i % len(prompts)] for i in range(count)], f"{path}: {how}; {len(prompts)} distinct"


def arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of a Poisson process of `rate` per second: exponential gaps
    from the seed, the first request at 0; all at 0 for an infinite rate."""
    rng = random.Random(f"{seed}/arrivals")
    times, t = [], 0.0
    for i in range(count):
        if i and rate != math.inf:
            t += rng.expovariate(rate)
        times.append(t)
    return times


# ---------------------------------------------------------------------------------------------
# One request

@dataclass(frozen=True)
class RequestSample:
    """One request: raw times in seconds from the start of the run, counts, outcome."""
    index: int
    scheduled_s: float | None     # its Poisson arrival; None in a closed loop
    start_s: float                # sent
    token_s: list[float]          # each token chunk's arrival
    end_s: float                  # the stream's end (or the error)
    prompt_tokens: int | None     # usage.prompt_tokens, else the client's count
    output_tokens: int            # usage.completion_tokens, else the token chunks
    tokens_from: str              # "usage" or "chunks"
    finish_reason: str | None
    status: int | None            # HTTP status; None: no response
    error: str | None             # None: success

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_ms(self) -> float | None:
        return 1e3 * (self.token_s[0] - self.start_s) if self.ok else None

    @property
    def e2e_ms(self) -> float | None:
        return 1e3 * (self.end_s - self.start_s) if self.ok else None

    @property
    def tpot_ms(self) -> float | None:
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1) if self.ok and self.output_tokens > 1 else None

    @property
    def itl_ms(self) -> list[float]:
        return [1e3 * (b - a) for a, b in zip(self.token_s, self.token_s[1:])] if self.ok else []

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms,
                "itl_ms": self.itl_ms}


@dataclass
class Stream:
    """What a streamed response said so far, fed one line at a time (server-sent events)."""
    token_s: list[float] = field(default_factory=list)
    usage: dict | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False

    def feed(self, line: str, now: float) -> None:
        if not line.startswith("data:"):
            return                                   # blank separators, comments, event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("error"):
            self.error = f"error event: {error_text(event) if event else payload[:200]}"
            self.done = True
            return
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        choices = event.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            finish = choices[0].get("finish_reason")
            if choices[0].get("text") or not finish:
                self.token_s.append(now)
            self.finish_reason = finish or self.finish_reason


def error_text(body: Any) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), or the body itself."""
    if isinstance(body, dict):
        inner = body.get("error", body.get("detail", body))
        body = inner.get("message", inner) if isinstance(inner, dict) else inner
    return " ".join(str(body).split())[:200]


def http_error(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", "replace")
    return f"HTTP {status}: {error_text(body)}"


def request_body(model: str, prompt: Prompt, output_len: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt.prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def send_request(client, url: str, body: dict, headers: dict, timeout: float, t0: float, index: int,
                       scheduled: float | None, prompt_tokens: int | None) -> RequestSample:
    """POST one streamed completion and time it (module docstring)."""
    import httpx

    stream, status = Stream(), None
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout), client.stream("POST", url, json=body, headers=headers) as r:
            status = r.status_code
            if status != 200:
                stream.error = http_error(status, await r.aread())
            else:
                await read_stream(r, stream, t0)
    except TimeoutError:
        stream.error = f"timed out after {timeout:g} s"
    except httpx.HTTPError as e:
        stream.error = f"{type(e).__name__}: {' '.join(str(e).split()) or 'no detail'}"
    end = time.perf_counter()
    error = stream.error or (None if stream.done else "the stream ended before data: [DONE]") or \
        (None if stream.token_s else "the stream held no token")
    usage = stream.usage or {}
    counted, prompt_counted = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return RequestSample(
        index=index, scheduled_s=scheduled, start_s=start - t0, token_s=stream.token_s, end_s=end - t0,
        prompt_tokens=prompt_counted if isinstance(prompt_counted, int) else prompt_tokens,
        output_tokens=counted if isinstance(counted, int) else len(stream.token_s),
        tokens_from="usage" if isinstance(counted, int) else "chunks", finish_reason=stream.finish_reason,
        status=status, error=error)


async def read_stream(response, stream: Stream, t0: float) -> None:
    async for line in response.aiter_lines():
        stream.feed(line, time.perf_counter() - t0)
        if stream.done:
            return


# ---------------------------------------------------------------------------------------------
# The run

async def run_load(url: str, model: str, prompts: list[Prompt], output_len: int, arrivals: list[float] | None,
                   cap: int | None, api_key: str | None, timeout: float,
                   on_request: OnRequest | None) -> list[RequestSample]:
    """Send every prompt: each at its arrival time (None: at once), at most `cap` in flight."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(cap) if cap else None
    samples: list[RequestSample] = []
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap or 64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int, scheduled: float | None) -> None:
            try:
                body = request_body(model, prompts[i], output_len)
                sample = await send_request(client, f"{url}/v1/completions", body, headers, timeout, t0, i,
                                            scheduled, prompts[i].tokens)
            finally:
                if slots:
                    slots.release()
            samples.append(sample)
            if on_request is not None:
                on_request(len(samples), len(prompts), sample)

        tasks = []
        for i in range(len(prompts)):
            scheduled = arrivals[i] if arrivals else None
            if scheduled is not None:
                await asyncio.sleep(max(0.0, t0 + scheduled - time.perf_counter()))
            if slots:
                await slots.acquire()
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    return sorted(samples, key=lambda s: s.index)


LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
LATENCY_STATS = ("mean", "p50", "p90", "p99")


def summarize(samples: list[RequestSample], slo: SLO) -> dict[str, Metric]:
    """Every metric of the run (module docstring), from its samples alone: `LATENCY_STAT` (ttft_ms_p90,
    ...) from the successful requests' records (ITL: every gap of every request), absent when no
    request has that latency; rates and counts as exact values."""
    records = {"requests": [s.to_json() for s in samples]}
    ok = [s for s in samples if s.ok]
    wall = max(s.end_s for s in samples) - min(s.scheduled_s if s.scheduled_s is not None else s.start_s
                                               for s in samples)
    inputs = [s.prompt_tokens for s in ok]
    output = sum(s.output_tokens for s in ok)
    metrics: dict[str, Metric] = {}
    for key in LATENCIES:
        if any(r[key] for r in records["requests"] if r["ok"]):
            for stat in LATENCY_STATS:
                metrics[f"{key}_{stat}"] = sampled(stat, "requests", key, records, "ms", "lower")
    return {
        **metrics,
        "request_throughput": exact(len(ok) / wall, "req/s", "higher"),
        "output_throughput": exact(output / wall, "tok/s", "higher"),
        **({"goodput": exact(sum(map(slo.met_by, ok)) / wall, "req/s", "higher")} if slo.given else {}),
        "completed": exact(len(ok), "requests", "higher"),
        "failed": exact(len(samples) - len(ok), "requests", "lower"),
        "total_input_tokens": exact(None if None in inputs else sum(inputs), "tokens"),
        "total_output_tokens": exact(output, "tokens"),
        "duration_s": exact(wall, "s"),
    }


@dataclass(frozen=True)
class ServeResult:
    model: dict[str, Any]          # the model name sent, the tokenizer, the launched path (and its identity)
    config: dict[str, Any]         # every option, how the prompts and arrivals were made, the request
    env: dict[str, Any]            # versions, CPU, load at the start and the end (of this client's machine)
    server: dict[str, Any]         # url, and the command when --launch started it
    metrics: dict[str, Metric]
    samples: list[RequestSample]

    def value(self, name: str):
        m = self.metrics.get(name)
        return None if m is None else m.value

    def to_result(self) -> BenchResult:
        """The result in the bench schema (llmc.bench.result): per-request records in `requests`."""
        return BenchResult(kind="serve", model=self.model, env=self.env, config=self.config, metrics=self.metrics,
                           samples={"requests": [s.to_json() for s in self.samples]}, details={"server": self.server})

    def to_json(self) -> dict[str, Any]:
        """The result file's content (llmc.io.stamp_json adds the producer)."""
        return self.to_result().to_json()


# ---------------------------------------------------------------------------------------------
# The server: a running one, or one started with --launch (llmc.bench.launch)

def first_model(url: str, headers: dict, timeout: float) -> str:
    """The first model id of GET {url}/v1/models."""
    import httpx
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=min(timeout, 30.0))
        if r.status_code != 200:
            raise ConfigError(f"{url}/v1/models: {http_error(r.status_code, r.content)}", hint="pass --model NAME")
        return str(r.json()["data"][0]["id"])
    except httpx.HTTPError as e:
        raise ConfigError(f"{url}/v1/models: {type(e).__name__}: {' '.join(str(e).split())}",
                          hint="is the server running at that URL?") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(f"{url}/v1/models: no model listed", hint="pass --model NAME") from None


def _describe_load(concurrency: int | None, request_rate: float | None, seed: int) -> str:
    if request_rate is None:
        return f"closed loop: {concurrency} in flight"
    cap = f", at most {concurrency} in flight" if concurrency else ", in flight unbounded"
    return f"Poisson arrivals at {request_rate:g} req/s (seed {seed}){cap}"


def bench_serve(url: str | None = None, *, launch: Path | str | None = None, dataset: Path | str | None = None,
                input_len: int = 128, output_len: int = 128, num_requests: int = 32, concurrency: int | None = None,
                request_rate: float | None = None, seed: int = 0, slo: SLO | str | None = None,
                model: str | None = None, api_key: str | None = None, tokenizer: Path | str | None = None,
                serve_args: Sequence[str] = (), timeout: float = 300.0, ready_timeout: float = READY_TIMEOUT_S,
                on_status: OnStatus | None = None, on_request: OnRequest | None = None) -> ServeResult:
    """Load the server at `url` (or one `llmc serve launch` started, stopped after) with
    `num_requests` completions and measure them (the protocol in the module docstring). `tokenizer`
    (default: the `launch` path) makes random prompts and counts prompt tokens. `on_status(text)`
    tells what is happening; `on_request(done, total, sample)` is called as each request ends."""
    from llmc.bench.environment import environment, package_version

    slo = slo if isinstance(slo, SLO) else parse_slo(slo)
    check_options(url, launch, dataset, tokenizer, input_len, output_len, num_requests, concurrency, request_rate,
                  seed, timeout, serve_args)
    if concurrency is None and request_rate is None:
        concurrency = DEFAULT_CONCURRENCY
    tokenizer = tokenizer if tokenizer is not None else launch
    tk = load_tokenizer(tokenizer)
    prompts, how = (dataset_prompts(Path(dataset), num_requests, input_len, tk) if dataset is not None
                    else random_prompts(tk, num_requests, input_len, seed))
    arrivals = arrival_times(num_requests, request_rate, seed) if request_rate is not None else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    command = serve_command(launch, serve_args) if launch is not None else None
    status = on_status or (lambda text: None)
    env = {**environment(), "httpx": package_version("httpx")}
    if command:
        status(f"starting {' '.join(command)}")
    with launched(command, ready_timeout, headers) if command else nullcontext(base_url(url)) as root:
        name = model or first_model(root, headers, timeout)
        status(f"{num_requests} requests to {root}")
        samples = asyncio.run(run_load(root, name, prompts, output_len, arrivals, concurrency, api_key, timeout,
                                       on_request))
    env["loadavg_end"] = list(os.getloadavg())
    config = {"url": url, "launch": None if launch is None else str(launch), "dataset": None if dataset is None
              else str(dataset), "input_len": input_len, "output_len": output_len, "num_requests": num_requests,
              "concurrency": concurrency, "seed": seed,
              "request_rate": "inf" if request_rate == math.inf else request_rate, "slo": asdict(slo),
              "dataset_sha256": None if dataset is None else sha256_file(Path(dataset)),
              "timeout_s": timeout, "tokenizer": None if tokenizer is None else str(tokenizer),
              "serve_args": list(serve_args), "api_key": "given" if api_key else None, "prompts": how,
              "arrivals": _describe_load(concurrency, request_rate, seed),
              "request": {k: v for k, v in request_body(name, Prompt("", None), output_len).items()
                          if k not in ("model", "prompt")}}
    identity = model_identity(launch) if launch is not None else {"path": None, "sha256": None, "recipe": None}
    return ServeResult(model={"name": name, "tokenizer": config["tokenizer"], "launch": config["launch"], **identity},
                       config=config, env=env, server={"url": root, "command": command},
                       metrics=summarize(samples, slo), samples=samples)
