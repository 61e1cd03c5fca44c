"""`serve`: load a model, start its engine loop and the HTTP API, serve until SIGTERM / SIGINT, drain.

Drain: the first signal turns /ready to 503 and refuses new requests with 503, while the requests in
flight finish; after `drain_timeout` seconds those still running end with finish_reason "abort".
Then the server stops and `serve` returns 0. A second signal stops at once (in-flight requests are
aborted).
"""
from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import uvicorn

from llmc.errors import ConfigError, OptionError
from llmc.runtime.runner import RuntimeConfig

if TYPE_CHECKING:
    from llmc.server.app import ServerState

DRAIN_POLL_S = 0.05
# Tokens per step when serving: a step runs its prefill chunks and every running request's decode
# together, so a large budget stalls every stream behind a burst of prompts (2,048 prompt tokens are
# ~4 s on 2 cores) and keeps requests that arrived together in lockstep. 256 prefills about one prompt
# per step: measured with 32 clients (128 -> 128 tokens, SmolLM-135M shape, w8a16), mean TTFT 1.7-2.0 s
# against 5-7 s at 2,048, at the same output tokens/s within the run-to-run noise.
SERVE_MAX_BATCHED_TOKENS = 256


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000                      # 0: a free port, printed
    api_key: str | None = None            # /v1/* then need "Authorization: Bearer KEY"
    served_model_name: str | None = None  # the model's name in the API (default: the directory's name)
    max_queue: int = 256                  # waiting requests; more get 429
    request_timeout: float | None = None  # seconds; then the request is aborted
    drain_timeout: float = 30.0           # seconds in-flight requests get to finish on shutdown
    max_body_bytes: int = 4 << 20
    chat_template: Path | None = None     # a Jinja file instead of the checkpoint's chat_template
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(max_batched_tokens=SERVE_MAX_BATCHED_TOKENS))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise OptionError("port", f"must be in [0, 65535], got {self.port}")
        for name in ("max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise OptionError("request_timeout", f"must be > 0 seconds, got {self.request_timeout}")
        if not self.drain_timeout >= 0:
            raise OptionError("drain_timeout", f"must be >= 0 seconds, got {self.drain_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("api_key", "must not be empty")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


@dataclass
class Server:
    """A server built and bound, not yet serving: `run` serves until stopped (a signal, or `stop`)."""
    http: "DrainingServer"
    sock: socket.socket
    state: "ServerState"
    summary: dict

    @property
    def url(self) -> str:
        return self.summary["url"]

    def run(self) -> int:
        self.state.loop.start()
        try:
            self.http.run(sockets=[self.sock])
        finally:
            self.state.loop.shutdown()
            self.sock.close()
        return 0

    def stop(self) -> None:
        """Stop without draining (from another thread)."""
        self.http.should_exit = True


def make_server(path: Path | str, config: ServeConfig = ServeConfig(), *, model=None) -> Server:
    """Load the model at `path` (or take `model`, loaded from it), build its engine loop and HTTP app,
    and bind the socket."""
    from llmc.inspection import inspect
    from llmc.loader import load_model
    from llmc.runtime.engine_loop import EngineLoop
    from llmc.server.app import ServerState, build_app
    from llmc.server.chat import load_chat_template
    from llmc.server.metrics import ServerMetrics

    model = model or load_model(path)
    chat = load_chat_template(model.tokenizer.directory, config.chat_template)
    metrics = ServerMetrics()
    loop = EngineLoop(model, config.runtime, max_queue=config.max_queue, observer=metrics)
    metrics.watch(loop.stats)
    name = config.served_model_name or Path(path).resolve().name
    state = ServerState(loop=loop, model_name=name, metrics=metrics, chat=chat, api_key=config.api_key,
                        request_timeout=config.request_timeout, max_body_bytes=config.max_body_bytes)
    report = inspect(path, model=model)
    sock = bind(config.host, config.port)
    runner = loop.runner
    summary = {"model": name, "path": str(path), "architecture": report.architecture,
               "quantization": report.quantization or report.compute_dtype,
               "kv_cache_tokens": runner.capacity_tokens, "kv_cache_dtype": report.kv_cache_dtype,
               "max_model_len": runner.max_model_len, "max_num_seqs": runner.cfg.max_num_seqs,
               "prefix_caching": runner.cfg.prefix_caching, "kernels": runner.backend.report().get("kernels"),
               "chat_template": chat is not None, "auth": config.api_key is not None, "url": url_of(sock)}
    http = DrainingServer(uvicorn.Config(build_app(state), log_level="warning", access_log=False, lifespan="off",
                                         timeout_graceful_shutdown=5), state, config.drain_timeout)
    return Server(http, sock, state, summary)


def serve(path: Path | str, config: ServeConfig = ServeConfig(), *, model=None,
          on_listening: Callable[[str, dict], None] | None = None) -> int:
    """Serve the model at `path` (checkpoint, quantized checkpoint or engine) until a signal; returns
    the exit code (0 after a drain). `on_listening(url, summary)` is called once the server accepts
    connections and a signal drains it."""
    server = make_server(path, config, model=model)
    _log_requests()
    if on_listening is not None:
        server.http.on_started = lambda: on_listening(server.url, server.summary)
    return server.run()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server whose first SIGTERM / SIGINT drains instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, state, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.on_started: Callable[[], None] | None = None    # once it accepts connections and signals drain

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.on_started is not None and not self.should_exit:
            self.on_started()

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:                           # a second signal: stop now
            self.state.loop.abort_all()
            super().handle_exit(sig, frame)
            self.force_exit = True
            return
        self.state.draining = True
        self.state.loop.close_intake()
        threading.Thread(target=self._drain, name="llmc-drain", daemon=True).start()

    def _drain(self) -> None:
        loop = self.state.loop
        logging.getLogger("llmc.serve").info("draining: %d request(s) in flight get up to %.0f s to finish",
                                             loop.stats().running + loop.num_waiting, self.drain_timeout)
        if not _wait_idle(loop, self.drain_timeout):
            loop.abort_all()
            _wait_idle(loop, 5.0)
        time.sleep(0.2)                                   # the last responses leave the event loop
        self.should_exit = True


def _wait_idle(loop, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not loop.idle and time.monotonic() < end:
        time.sleep(DRAIN_POLL_S)
    return loop.idle


def _log_requests() -> None:
    """One line per request on stderr (llmc.server.app logs them)."""
    logger = logging.getLogger("llmc.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
