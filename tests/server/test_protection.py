"""What the server refuses, and how: API keys, a full queue, bad requests, oversized bodies; and
/metrics with every contracted name, read by prometheus_client's own parser."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmc.runtime.runner import RuntimeConfig
from tests.helpers import STORIES
from tests.server.conftest import running

METRIC_NAMES = {
    "gauge": ["llmc_requests_waiting", "llmc_requests_running", "llmc_kv_blocks_total", "llmc_kv_blocks_used",
              "llmc_kv_blocks_cached"],
    "counter": ["llmc_prompt_tokens", "llmc_generation_tokens", "llmc_prefix_cache_hit_tokens",
                "llmc_preemptions", "llmc_requests_finished", "llmc_requests_rejected"],
    "histogram": ["llmc_time_to_first_token_seconds", "llmc_inter_token_latency_seconds",
                  "llmc_e2e_request_latency_seconds"],
}


@pytest.fixture(scope="module")
def server(stories_model):
    with running(STORIES, model=stories_model, max_body_bytes=10_000) as s:
        yield s


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 4, "bogus": 1}, "bogus"),
    ({"prompt": "hi", "temperature": 5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 600}, "max_tokens"),            # past the 512-token context
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_completion_requests_get_a_400_naming_the_field(http, body, param):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    e = error_of(r)
    assert e["param"] == param and e["type"] == "invalid_request_error" and e["message"]


def test_invalid_json_an_unknown_model_and_a_huge_body(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = http.post("/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = http.post("/v1/completions", json={"prompt": "x" * 20_000})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"
    r = http.post("/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"


def test_the_api_key_is_required_on_v1_only(stories_model):
    with running(STORIES, model=stories_model, api_key="s3cret") as s, httpx.Client(base_url=s.url) as c:
        body = {"prompt": "Once", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
        text = c.get("/metrics").text
        assert 'llmc_requests_rejected_total{reason="invalid_api_key"} 5.0' in text


def test_a_full_queue_answers_429_with_retry_after(stories_model):
    """One sequence at a time and room for one waiting: a third request is refused at once."""
    with running(STORIES, model=stories_model, max_queue=1, runtime=RuntimeConfig(max_num_seqs=1)) as s:
        step = s.state.loop.runner.step
        gate = threading.Event()

        def slow_step():                           # after each step, hold the loop until the test saw the 429
            events = step()
            gate.wait(30)
            return events
        s.state.loop.runner.step = slow_step
        body = {"prompt": "Once upon a time", "max_tokens": 3}
        results = []

        def wait_for(running, waiting):
            deadline = time.monotonic() + 20
            while (s.state.loop.stats().running, s.state.loop.num_waiting) != (running, waiting):
                assert time.monotonic() < deadline, s.state.loop.stats()
                time.sleep(0.01)
        threads = []
        for running_, waiting_ in ((1, 0), (1, 1)):      # one running (held after its first step), one waiting
            threads.append(threading.Thread(target=lambda: results.append(
                httpx.post(f"{s.url}/v1/completions", json=body, timeout=60))))
            threads[-1].start()
            wait_for(running_, waiting_)
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        gate.set()
        for t in threads:
            t.join(60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert error_of(r)["code"] == "queue_full"
        assert [x.status_code for x in results] == [200, 200]
        text = httpx.get(f"{s.url}/metrics").text
        assert 'llmc_requests_rejected_total{reason="queue_full"} 1.0' in text


def test_metrics_parse_and_hold_every_name(http):
    assert http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8}).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    for kind, names in METRIC_NAMES.items():
        for name in names:
            assert name in families and families[name].type == kind, name
    samples = {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families.values() for s in f.samples}
    assert samples['llmc_kv_blocks_used{}'] == 0 and samples['llmc_kv_blocks_total{}'] > 0
    assert samples['llmc_generation_tokens_total{}'] >= 8
    assert samples['llmc_requests_finished_total{"finish_reason": "length"}'] >= 1
    assert samples['llmc_time_to_first_token_seconds_count{}'] >= 1
