"""`bench serve`: the metrics against hand-computed values, arrivals (Poisson reproducible from the seed, the
concurrency cap held), the requests sent, errors counted, datasets, the result file, --launch with a fake
server, and option errors. The load runs against a fake OpenAI-compatible server on 127.0.0.1 (in a thread,
or as a process for --launch) that streams one chunk per token after a short sleep. No timing assertions."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from llmc.bench import launch
from llmc.bench import serve as bs
from llmc.bench.serve import SLO, RequestSample, Stream, arrival_times, bench_serve, parse_slo, summarize
from llmc.errors import ConfigError, OptionError

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 100


# ---- a fake server ----------------------------------------------------------------------------

class FakeServer:
    """OpenAI-compatible enough: /v1/models, /ready (503 for `ready_after` s, then 200) and a streamed
    /v1/completions of max_tokens chunks, `token_sleep` s apart, usage last (unless usage=False). Every
    `fail_every`-th request gets a 500. It counts the requests in flight: from receiving one until just
    before its last bytes, so a client can only send its next request after the count went down."""

    def __init__(self, token_sleep: float = 0.002, fail_every: int = 0, usage: bool = True,
                 ready_after: float = 0.0) -> None:
        self.token_sleep, self.fail_every, self.usage = token_sleep, fail_every, usage
        self.ready_at = time.monotonic() + ready_after
        self.bodies, self.headers = [], []
        self.received = self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def begin(self, body: dict, headers: dict) -> int:
        with self.lock:
            self.bodies.append(body)
            self.headers.append(headers)
            self.received += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.received

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(fake: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def send_json(self, status: int, obj: dict) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            elif self.path == "/ready":
                ready = time.monotonic() >= fake.ready_at
                self.send_json(200 if ready else 503, {"ready": ready})
            else:
                self.send_json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = fake.begin(body, dict(self.headers))
            if fake.fail_every and n % fake.fail_every == 0:
                fake.end()
                self.send_json(500, {"error": {"message": "fake failure", "type": "server_error"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            tokens = body["max_tokens"]
            for k in range(tokens):
                time.sleep(fake.token_sleep)
                last = "length" if k == tokens - 1 else None
                self.event({"choices": [{"index": 0, "text": f" t{k}", "finish_reason": last}]})
            prompt = body["prompt"]
            if fake.usage:
                used = len(prompt) if isinstance(prompt, list) else len(prompt.split())
                self.event({"choices": [], "usage": {"prompt_tokens": used, "completion_tokens": tokens,
                                                     "total_tokens": used + tokens}})
            fake.end()
            self.wfile.write(b"data: [DONE]\n\n")

        def event(self, obj: dict) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()
    return Handler


@pytest.fixture
def fake():
    with FakeServer() as f:
        yield f


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """A checkpoint directory with just a tokenizer: words w3..w99, <s> = 1, </s> = 2, BOS added."""
    from tests.helpers import write_word_tokenizer
    d = tmp_path_factory.mktemp("tok")
    write_word_tokenizer(d, VOCAB)
    (d / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}))
    return d


def cli(capsys, *args: str):
    from llmc.cli import main
    main(["bench", "serve", *map(str, args)])
    return capsys.readouterr()


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli(capsys, *args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def sample(index=0, start=0.0, tokens=(), end=1.0, output=None, error=None, scheduled=None) -> RequestSample:
    return RequestSample(index=index, scheduled_s=scheduled, start_s=start, token_s=list(tokens), end_s=end,
                         prompt_tokens=8, output_tokens=len(tokens) if output is None else output,
                         tokens_from="chunks", finish_reason="length", status=200 if error is None else 500,
                         error=error)


# ---- metrics by hand --------------------------------------------------------------------------

def percentile(xs, q):
    return float(np.percentile(xs, q))        # linear between ranks, as the result's "p90" statistic


def test_metrics_of_fixed_samples():
    samples = [
        sample(0, start=0.0, tokens=(0.1, 0.2, 0.4), end=0.4),         # TTFT 100, ITL 100 200, e2e 400, TPOT 150
        sample(1, start=0.5, tokens=(0.8, 0.9, 1.0), end=1.1),         # TTFT 300, ITL 100 100, e2e 600, TPOT 150
        sample(2, start=1.0, tokens=(1.05,), end=1.05),                # TTFT 50, one token: no TPOT, no ITL
        sample(3, start=1.0, tokens=(), end=2.0, error="HTTP 500: x"),  # failed: in no latency
    ]
    m = {k: v.value for k, v in summarize(samples, SLO(ttft_ms=200)).items()}
    assert m["ttft_ms_mean"] == pytest.approx(150) and m["ttft_ms_p50"] == pytest.approx(100)
    assert m["ttft_ms_p90"] == pytest.approx(260)
    assert m["tpot_ms_mean"] == pytest.approx(150)
    assert m["itl_ms_p50"] == pytest.approx(100) and m["itl_ms_p99"] == pytest.approx(197)
    assert m["itl_ms_mean"] == pytest.approx(125)
    assert m["e2e_ms_p50"] == pytest.approx(400) and m["e2e_ms_mean"] == pytest.approx(350)
    full = summarize(samples, SLO(ttft_ms=200))
    assert all(full[f"{k}_{q}"].unit == "ms" and full[f"{k}_{q}"].direction == "lower"
               for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms") for q in ("mean", "p50", "p90", "p99"))
    assert m["duration_s"] == pytest.approx(2.0)                        # first start to last end
    assert (full["request_throughput"].value, full["request_throughput"].unit) == (pytest.approx(1.5), "req/s")
    assert full["request_throughput"].direction == "higher" and full["request_throughput"].statistic is None
    assert m["output_throughput"] == pytest.approx(7 / 2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (24, 7)
    assert m["goodput"] == pytest.approx(2 / 2.0)                                     # TTFT 100, 50
    assert summarize(samples, SLO(tpot_ms=149))["goodput"].value == pytest.approx(1 / 2.0)  # the single token
    assert summarize(samples, SLO(ttft_ms=200, tpot_ms=149))["goodput"].value == pytest.approx(1 / 2.0)
    assert "goodput" not in summarize(samples, SLO())


def test_poisson_arrivals_come_from_the_seed():
    a = arrival_times(4000, 50.0, seed=7)
    assert a == arrival_times(4000, 50.0, seed=7) and a != arrival_times(4000, 50.0, seed=8)
    assert a[0] == 0 and all(x <= y for x, y in zip(a, a[1:]))
    assert a[-1] / (len(a) - 1) == pytest.approx(1 / 50.0, rel=0.06)           # mean gap 1/R
    gaps = sorted(y - x for x, y in zip(a, a[1:]))
    assert gaps[len(gaps) // 2] == pytest.approx(math.log(2) / 50.0, rel=0.1)   # exponential: median ln2/R
    assert arrival_times(5, math.inf, seed=0) == [0.0] * 5


def test_stream_events():
    s = Stream()
    for t, line in enumerate(["", ": comment", 'data: {"choices": [{"text": "a", "finish_reason": null}]}',
                              'data:{"choices": [{"text": "", "finish_reason": null}]}',       # a token, no text
                              'data: {"choices": [{"text": "", "finish_reason": "length"}]}',  # an end marker
                              'data: {"choices": [], "usage": {"completion_tokens": 2}}', "data: [DONE]"]):
        s.feed(line, float(t))
    assert (s.token_s, s.finish_reason, s.usage, s.done, s.error) == ([2.0, 3.0], "length", {"completion_tokens": 2},
                                                                        True, None)
    bad = Stream()
    bad.feed('data: {"error": {"message": "out of memory", "code": 500}}', 0.0)
    assert bad.done and bad.error == "error event: out of memory"
    odd = Stream()
    for line in ('data: {"choices": {"text": "a"}}', 'data: {"choices": ["a"]}', 'data: {"usage": 3}'):
        odd.feed(line, 0.0)
    assert (odd.token_s, odd.usage, odd.error) == ([], None, None)


@pytest.mark.parametrize("text,slo", [("ttft=500,tpot=50", SLO(500.0, 50.0)), ("tpot=2.5", SLO(None, 2.5)),
                                      (" ttft = 100 ", SLO(100.0, None)), (None, SLO())])
def test_parse_slo(text, slo):
    assert parse_slo(text) == slo


# ---- load against the fake server ---------------------------------------------------------------

def test_closed_loop_keeps_n_in_flight_and_asks_for_exact_outputs(fake, tok):
    done = []
    r = bench_serve(fake.url, tokenizer=tok, input_len=6, output_len=4, num_requests=12, concurrency=3, seed=1,
                    on_request=lambda n, total, s: done.append((n, total)))
    assert fake.max_in_flight == 3 and done == [(n, 12) for n in range(1, 13)]
    assert [s.index for s in r.samples] == list(range(12)) and all(s.ok for s in r.samples)
    assert all(s.output_tokens == 4 and s.tokens_from == "usage" and s.prompt_tokens == 6 for s in r.samples)
    for b in fake.bodies:
        assert {k: v for k, v in b.items() if k != "prompt"} == {
            "model": "fake-model", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
        assert len(b["prompt"]) == 6 and all(3 <= i < VOCAB for i in b["prompt"])
    again = bench_serve(fake.url, tokenizer=tok, input_len=6, output_len=4, num_requests=12, concurrency=3, seed=1)
    assert sorted(b["prompt"] for b in fake.bodies[12:]) == sorted(b["prompt"] for b in fake.bodies[:12])
    assert r.config["concurrency"] == 3 and again.value("completed") == 12


def test_request_rate_follows_the_arrivals_under_the_cap(fake, tok):
    r = bench_serve(fake.url, tokenizer=tok, input_len=4, output_len=4, num_requests=10, request_rate=200.0,
                    concurrency=2, seed=3, model="given", api_key="sk-test")
    assert fake.max_in_flight <= 2 and all(s.ok for s in r.samples)
    assert [s.scheduled_s for s in r.samples] == arrival_times(10, 200.0, seed=3)
    assert all(s.start_s >= s.scheduled_s for s in r.samples)
    assert {b["model"] for b in fake.bodies} == {"given"}
    assert {h["Authorization"] for h in fake.headers} == {"Bearer sk-test"} and r.config["api_key"] == "given"


def test_request_rate_alone_is_unbounded(fake, tok):
    r = bench_serve(fake.url, tokenizer=tok, input_len=4, output_len=8, num_requests=6, request_rate=math.inf)
    assert r.config["concurrency"] is None and fake.max_in_flight > 1 and r.value("completed") == 6
    assert json.loads(json.dumps(r.to_json(), allow_nan=False))["config"]["request_rate"] == "inf"   # strict JSON


def test_errors_are_counted_not_measured(tok):
    with FakeServer(fail_every=3) as fake:
        r = bench_serve(fake.url, tokenizer=tok, input_len=4, output_len=4, num_requests=9, concurrency=1)
    failed = [s for s in r.samples if not s.ok]
    assert [s.index for s in failed] == [2, 5, 8]
    assert {(s.status, s.error) for s in failed} == {(500, "HTTP 500: fake failure")}
    assert (r.value("completed"), r.value("failed")) == (6, 3)
    assert r.value("ttft_ms_mean") is not None and r.value("total_output_tokens") == 24


def test_timeouts_and_refused_connections_are_failures(tok):
    with FakeServer(token_sleep=0.2) as fake:
        r = bench_serve(fake.url, tokenizer=tok, input_len=4, output_len=4, num_requests=2, timeout=0.1)
    assert [(s.status, s.error) for s in r.samples] == [(200, "timed out after 0.1 s")] * 2
    r = bench_serve(f"http://127.0.0.1:{closed_port()}", model="m", tokenizer=tok, input_len=4, num_requests=2)
    assert all(s.status is None and s.error.startswith("ConnectError") for s in r.samples)
    assert r.value("failed") == 2 and "ttft_ms_mean" not in r.metrics and r.value("request_throughput") == 0


def test_tokens_are_counted_from_chunks_without_usage(tok):
    with FakeServer(usage=False) as fake:
        r = bench_serve(fake.url, tokenizer=tok, input_len=4, output_len=5, num_requests=2)
    assert all(s.tokens_from == "chunks" and s.output_tokens == 5 and len(s.token_s) == 5 for s in r.samples)
    assert all(s.prompt_tokens == 4 for s in r.samples)                     # the client's count


def test_text_dataset_is_cut_into_windows(fake, tok, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(3, 30)) + "\n")         # 27 words: 3 windows of 8 (+3 dropped)
    r = bench_serve(fake.url, tokenizer=tok, dataset=text, input_len=8, output_len=2, num_requests=4)
    windows = [" ".join(f"w{i}" for i in range(a, a + 8)) for a in (3, 11, 19)]
    assert [b["prompt"] for b in fake.bodies] == [*windows, windows[0]]
    assert all(s.prompt_tokens == 8 for s in r.samples)                       # the server's usage
    assert "3 distinct" in r.config["prompts"] and "tokenizer" in r.config["prompts"]
    bench_serve(fake.url, dataset=text, input_len=10, output_len=2, num_requests=2)   # no tokenizer: words
    assert [b["prompt"].split() for b in fake.bodies[4:]] == [[f"w{i}" for i in range(a, a + 10)] for a in (3, 13)]


def test_jsonl_dataset(fake, tok, tmp_path):
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "w5 w6 w7"}\n\n{"prompt": "w9", "other": 1}\n')
    r = bench_serve(fake.url, tokenizer=tok, dataset=lines, output_len=2, num_requests=3)
    assert [b["prompt"] for b in fake.bodies] == ["w5 w6 w7", "w9", "w5 w6 w7"]
    assert r.value("total_input_tokens") == 3 + 1 + 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w5"}\n{"text": "w6"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: each line must be a JSON object with a string 'prompt'"):
        bench_serve(fake.url, dataset=bad)


def test_random_prompts_need_a_vocabulary(fake):
    with pytest.raises(OptionError, match="random token-id prompts need the model's vocabulary"):
        bench_serve(fake.url, num_requests=1)


# ---- the command --------------------------------------------------------------------------------

ARGS = ["--input-len", "5", "--output-len", "3", "--num-requests", "6", "--concurrency", "2", "--seed", "4"]


def test_result_file_schema_and_recomputable_metrics(fake, tok, tmp_path, capsys):
    path = tmp_path / "serve.json"
    cli(capsys, "--url", fake.url + "/v1/", "--tokenizer", tok, *ARGS, "--slo", "ttft=60000,tpot=60000",
        "--json", path)
    r = json.loads(path.read_text())
    assert list(r) == ["producer", "schema", "kind", "model", "env", "config", "metrics", "samples", "details"]
    assert r["producer"].startswith("llmc ") and r["schema"] == "llmc.bench.result/1" and r["kind"] == "serve"
    assert r["model"] == {"name": "fake-model", "tokenizer": str(tok), "launch": None, "path": None, "sha256": None,
                          "recipe": None}
    assert r["details"]["server"] == {"url": fake.url, "command": None}
    assert {"input_len": 5, "output_len": 3, "num_requests": 6, "concurrency": 2, "request_rate": None, "seed": 4,
            "slo": {"ttft_ms": 60000.0, "tpot_ms": 60000.0}, "api_key": None}.items() <= r["config"].items()
    assert {"llmc", "cpu", "httpx", "loadavg_start", "loadavg_end"} <= set(r["env"])
    m, samples = {k: v["value"] for k, v in r["metrics"].items()}, r["samples"]["requests"]
    assert len(samples) == 6 and all(s["ok"] and s["output_tokens"] == 3 for s in samples)
    ttft = [1e3 * (s["token_s"][0] - s["start_s"]) for s in samples]
    assert [s["ttft_ms"] for s in samples] == pytest.approx(ttft)
    assert m["ttft_ms_p90"] == pytest.approx(percentile(ttft, 90))
    itl = [1e3 * (b - a) for s in samples for a, b in zip(s["token_s"], s["token_s"][1:])]
    assert m["itl_ms_mean"] == pytest.approx(sum(itl) / len(itl)) and sum(len(s["itl_ms"]) for s in samples) == 12
    tpot = [(s["e2e_ms"] - s["ttft_ms"]) / 2 for s in samples]
    assert m["tpot_ms_p50"] == pytest.approx(percentile(tpot, 50))
    wall = max(s["end_s"] for s in samples) - min(s["start_s"] for s in samples)
    assert m["duration_s"] == pytest.approx(wall) and m["goodput"] == pytest.approx(6 / wall)
    assert r["metrics"]["output_throughput"]["value"] == pytest.approx(18 / wall)
    assert r["metrics"]["failed"] == {"value": 0, "unit": "requests", "direction": "lower", "statistic": None,
                                      "samples": None, "of": []}
    assert r["metrics"]["ttft_ms_p90"]["statistic"] == "p90" and r["metrics"]["ttft_ms_p90"]["samples"] == "requests"


def test_table_and_json_to_stdout(fake, tok, capsys):
    out = cli(capsys, "--url", fake.url, "--tokenizer", tok, *ARGS)
    assert "llmc bench serve" in out.out and "TTFT" in out.out and "goodput" not in out.out
    rows = {line.split("│")[1].strip() for line in out.out.splitlines() if line.startswith("│")}
    assert {"TTFT ms", "TPOT ms", "ITL ms", "e2e ms", "request throughput", "output throughput"} <= rows
    r = json.loads(cli(capsys, "--url", fake.url, "--tokenizer", tok, *ARGS, "--json", "-").out)
    assert r["schema"] == "llmc.bench.result/1" and len(r["samples"]["requests"]) == 6


def test_failures_are_noted(tok, capsys):
    with FakeServer(fail_every=2) as fake:
        out = cli(capsys, "--url", fake.url, "--tokenizer", tok, *ARGS)
    assert "3 of 6 requests failed" in out.err and "HTTP 500: fake failure" in out.err


FAKE_SCRIPT = """
import json, os, signal, sys, time
mode = {mode!r}
with open({record!r}, "w") as f:
    json.dump({{"pid": os.getpid(), "argv": sys.argv[1:]}}, f)
if mode == "crash":
    sys.stderr.write("loading the engine\\nerror: boom: no such engine\\n")
    sys.exit(2)
if mode == "stuck":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("still loading", flush=True)
    time.sleep(600)
sys.path.insert(0, {root!r})
from tests.test_bench_serve import FakeServer
server = FakeServer(ready_after=0.3)
print("llmc serve: model fake-model, 1 engine loop", flush=True)
print(f"llmc serve: listening on {{server.url}} (Ctrl-C to stop)", flush=True)
server.httpd.serve_forever()
"""


@pytest.fixture
def fake_launch(tmp_path, monkeypatch):
    """serve_command replaced by a fake server script: `mode(name)` picks its behaviour; returns the
    file where the script records its pid and arguments."""
    record = tmp_path / "launched.json"

    def mode(name: str) -> Path:
        script = tmp_path / f"fake_{name}.py"
        script.write_text(FAKE_SCRIPT.format(root=str(ROOT), mode=name, record=str(record)))
        monkeypatch.setattr(bs, "serve_command", lambda path, args: [sys.executable, str(script), str(path), *args])
        return record
    return mode


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_starts_waits_for_ready_and_stops_the_server(fake_launch, tok, tmp_path, capsys):
    record = fake_launch("ok")
    path = tmp_path / "launched-result.json"
    cli(capsys, "--launch", tok, *ARGS, "--serve-arg=--max-num-seqs=4", "--serve-arg", "--kv-blocks=64",
        "--json", path)
    launched = json.loads(record.read_text())
    assert launched["argv"] == [str(tok), "--max-num-seqs=4", "--kv-blocks=64"] and gone(launched["pid"])
    r = json.loads(path.read_text())
    server = r["details"]["server"]
    assert server["url"].startswith("http://127.0.0.1:") and server["command"][-2:] == launched["argv"][-2:]
    assert {"name": "fake-model", "tokenizer": str(tok), "launch": str(tok),             # the tokenizer: PATH
            "path": str(tok), "sha256_of": "config.json"}.items() <= r["model"].items()
    assert r["metrics"]["completed"]["value"] == 6


def test_a_server_that_dies_is_one_line_with_its_last_words(fake_launch, tok, capsys):
    record = fake_launch("crash")
    line = cli_error(capsys, "--launch", tok, *ARGS)
    assert "the server exited with code 2" in line and "error: boom: no such engine" in line
    assert gone(json.loads(record.read_text())["pid"])


def test_a_server_that_never_listens_is_killed(fake_launch, tok, monkeypatch):
    record = fake_launch("stuck")
    monkeypatch.setattr(launch, "STOP_TIMEOUT_S", 0.5)                      # it ignores SIGTERM: SIGKILL
    with pytest.raises(ConfigError, match=r"did not start within 2 s .*printed `listening on URL`.*still loading"):
        bench_serve(launch=tok, num_requests=1, ready_timeout=2)
    assert gone(json.loads(record.read_text())["pid"])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,needle", [
    (["--url", "http://127.0.0.1:9", "--launch", "."], "--url: give either --url URL (a running server) or --launch "
                                                      "PATH (start `llmc serve PATH`), not both"),
    ([], "--url: give either --url URL"),
    (["--url", "localhost:8000"], "--url: expected http://HOST:PORT"),
    (["--slo", "ttft"], "--slo: expected ttft=MS,tpot=MS"),
    (["--slo", "ttft=fast"], "--slo: ttft: expected milliseconds, got 'fast'"),
    (["--slo", "ttft=-5"], "--slo: ttft: must be a positive number"),
    (["--slo", "e2e=5"], "--slo: expected ttft=MS,tpot=MS"),
    (["--num-requests", "-1"], "--num-requests: must be at least 1, got -1"),
    (["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
    (["--request-rate", "-2"], "--request-rate: must be a positive number"),
    (["--input-len", "0"], "--input-len: must be at least 1"),
    (["--output-len", "-3"], "--output-len: must be at least 1"),
    (["--timeout", "0"], "--timeout: must be a positive number of seconds"),
    (["--seed", "-1"], "--seed: must be at least 0"),
    (["--serve-arg", "--port=1"], "--serve-arg: passes arguments to the server --launch starts"),
    (["--dataset", "prompts.csv"], "--dataset: prompts.csv: expected a .txt or a .jsonl file"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer: /nonexistent/tok: no such directory"),
])
def test_bad_options_are_one_line_before_any_work(args, needle, capsys):
    url = [] if "--url" in args or not args else ["--url", "http://127.0.0.1:9"]     # nothing listens on port 9
    line = cli_error(capsys, *url, *args)
    assert needle in line, line


def test_an_unreachable_server_is_one_line(tok, capsys):
    line = cli_error(capsys, "--url", f"http://127.0.0.1:{closed_port()}", "--tokenizer", tok, "--num-requests", "1")
    assert "/v1/models: ConnectError" in line and "is the server running at that URL?" in line


def test_json_file_is_checked_before_the_run(fake, tok, tmp_path, capsys):
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}\n')
    assert "was not written by llmc" in cli_error(capsys, "--url", fake.url, "--tokenizer", tok, *ARGS,
                                                  "--json", foreign)
    assert fake.received == 0 and foreign.read_text() == '{"mine": 1}\n'
