"""`bench serve --launch`: `llmc serve` as a child process, started on a free port of 127.0.0.1,
waited for (its `listening on URL` line, then GET /ready answering 200), and stopped by its own pid
(SIGTERM, a bounded wait, SIGKILL). Both of its pipes are read to their end the whole time, so the
server never blocks on a full pipe, and their last lines explain a server that died or never got
ready."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from llmc.errors import ConfigError

READY_TIMEOUT_S = 600.0           # from the start of `llmc serve` until /ready answers 200
STOP_TIMEOUT_S = 30.0             # from SIGTERM until the server has exited (then SIGKILL)
LISTENING = re.compile(r"listening on (http://\S+)")


def serve_command(path: Path | str, serve_args: Sequence[str]) -> list[str]:
    """How --launch starts the server (the tests put a fake one here)."""
    return [sys.executable, "-m", "llmc", "serve", str(path), "--port", "0", "--host", "127.0.0.1", *serve_args]


def _pump(stream, tail: deque, found: queue.Queue | None) -> None:
    """Read a pipe of the server to its end (it must never fill), keeping its last lines."""
    for line in stream:
        tail.append(line.rstrip())
        if found is not None and (m := LISTENING.search(line)):
            found.put(m.group(1).rstrip("/.,;)"))
            found = None


class LaunchedServer:
    """`llmc serve` as a child process: started, waited for, stopped by its own pid."""

    def __init__(self, command: list[str], ready_timeout: float, headers: dict) -> None:
        self.command, self.ready_timeout, self.headers = command, ready_timeout, headers
        self.stdout, self.stderr = deque(maxlen=50), deque(maxlen=50)
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        """Start the server and return its URL once GET /ready says 200."""
        deadline = time.monotonic() + self.ready_timeout
        found: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace",
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pumps = [threading.Thread(target=_pump, args=a, daemon=True)
                      for a in ((self.proc.stdout, self.stdout, found), (self.proc.stderr, self.stderr, None))]
        for t in self.pumps:
            t.start()
        url = None
        while url is None:
            self._check_alive(deadline, "printed `listening on URL`")
            try:
                url = found.get(timeout=0.1)
            except queue.Empty:
                pass
        while not self._ready(url):
            self._check_alive(deadline, f"answered 200 on {url}/ready")
            time.sleep(0.1)
        return url

    def _ready(self, url: str) -> bool:
        import httpx
        try:
            return httpx.get(f"{url}/ready", headers=self.headers, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _check_alive(self, deadline: float, waiting_for: str) -> None:
        code = self.proc.poll()
        if code is None and time.monotonic() < deadline:
            return
        if code is not None:
            for t in self.pumps:          # the last words of a dead server
                t.join(timeout=2.0)
        what = f"exited with code {code}" if code is not None else f"did not start within {self.ready_timeout:g} s"
        tail = " | ".join(line for line in list(self.stderr or self.stdout)[-4:] if line) or "no output"
        raise ConfigError(f"the server {what} (waiting until it {waiting_for}): {tail}",
                          hint=f"it was started as: {' '.join(self.command)}")

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self.pumps:
            t.join(timeout=2.0)


@contextmanager
def launched(command: list[str], ready_timeout: float, headers: dict) -> Iterator[str]:
    server = LaunchedServer(command, ready_timeout, headers)
    try:
        yield server.start()
    finally:
        server.stop()
