"""Graceful drain: on SIGTERM /ready turns 503 and new requests get 503 while a long stream finishes;
past --drain-timeout what still runs ends with finish_reason "abort"; `llmc serve` then exits 0."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.helpers import STORIES
from tests.server.conftest import running

LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}


def read_stream(url: str, body: dict, seen_first: threading.Event, result: dict) -> None:
    reasons, done = [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        result["status"] = r.status_code
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                reasons += [c["finish_reason"] for c in json.loads(line[6:])["choices"]]
                seen_first.set()
    result.update(reasons=[x for x in reasons if x], tokens=len(reasons), done=done)


def held_loop(server, gate: threading.Event) -> None:
    """Make each step wait for `gate` after the first few, so a stream is surely in flight."""
    step, n = server.state.loop.runner.step, [0]

    def slow():
        n[0] += 1
        if n[0] > 3:
            gate.wait(0.05)
        return step()
    server.state.loop.runner.step = slow


def test_drain_refuses_new_work_and_lets_the_stream_finish(stories_model):
    with running(STORIES, model=stories_model, drain_timeout=60) as s:
        gate, first, result = threading.Event(), threading.Event(), {}
        held_loop(s, gate)
        reader = threading.Thread(target=read_stream, args=(s.url, LONG, first, result))
        reader.start()
        assert first.wait(30)
        s.http.handle_exit(signal.SIGTERM, None)           # what the SIGTERM handler calls
        assert httpx.get(f"{s.url}/ready").status_code == 503
        assert httpx.get(f"{s.url}/health").status_code == 200
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Tom", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        gate.set()
        reader.join(60)
        assert result["reasons"] == ["length"] and result["done"] == 1 and result["tokens"] == 400
        deadline = time.monotonic() + 30
        while not s.http.should_exit:                       # the drain ends the server once idle
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_past_the_drain_timeout_streams_end_with_abort(stories_model):
    with running(STORIES, model=stories_model, drain_timeout=0.3) as s:
        gate, first, result = threading.Event(), threading.Event(), {}
        held_loop(s, gate)                                   # never set: every step waits 50 ms
        reader = threading.Thread(target=read_stream, args=(s.url, LONG, first, result))
        reader.start()
        assert first.wait(30)
        s.http.handle_exit(signal.SIGTERM, None)
        reader.join(60)
        assert result["reasons"] == ["abort"] and result["done"] == 1 and result["tokens"] < 400


def test_llmc_serve_exits_0_after_sigterm_while_a_stream_finishes():
    proc = subprocess.Popen([sys.executable, "-m", "llmc", "serve", str(STORIES), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stdout:
            m = re.match(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:")
        first, result = threading.Event(), {}
        reader = threading.Thread(target=read_stream, args=(url, {**LONG, "max_tokens": 480}, first, result))
        reader.start()
        assert first.wait(60)
        os.kill(proc.pid, signal.SIGTERM)
        reader.join(60)
        assert proc.wait(60) == 0
        assert result["reasons"] == ["length"] and result["done"] == 1 and result["tokens"] == 480
        log = proc.stderr.read()
        assert "draining" in log and re.search(r"cmpl-\w+ in=\d+ out=480 .* status=ok finish=length", log), log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_request_past_its_timeout_ends_with_abort_and_frees_its_blocks(stories_model):
    with running(STORIES, model=stories_model, request_timeout=0.3) as s:
        held_loop(s, threading.Event())                     # every step after the third waits 50 ms
        t0 = time.monotonic()
        r = httpx.post(f"{s.url}/v1/completions", json={**LONG, "stream": False}, timeout=60)
        assert r.status_code == 200 and time.monotonic() - t0 < 10
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "abort" and r.json()["usage"]["completion_tokens"] < 400
        first, result = threading.Event(), {}
        read_stream(s.url, LONG, first, result)
        assert result["reasons"] == ["abort"] and result["done"] == 1
        deadline = time.monotonic() + 10
        while not s.state.loop.idle:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert s.state.loop.stats().kv_blocks_used == 0
