"""The engine loop: requests from several threads, aborts, a failing step that fails only its own
requests, stop strings that end a request the step they complete, and exactly one final output each."""
from __future__ import annotations

import threading

import pytest

from llmc.errors import ConfigError
from llmc.generation import generate
from llmc.loader import load_model
from llmc.runtime.engine_loop import Draining, EngineLoop
from llmc.runtime.runner import RuntimeConfig
from llmc.runtime.sampler import SamplingParams
from tests.helpers import STORIES


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES)


@pytest.fixture()
def loop(model):
    lp = EngineLoop(model, RuntimeConfig(max_num_seqs=8)).start()
    yield lp
    lp.shutdown()


def drain(stream):
    outs = list(stream)
    assert sum(o.finished for o in outs) == 1 and outs[-1].finished
    return outs


def test_requests_from_many_threads_each_end_exactly_once(loop, model):
    prompt = model.tokenizer.encode("Once upon a time")
    want = generate(None, [prompt], SamplingParams(max_tokens=20), model=model).completions[0]
    results = {}

    def client(i):
        results[i] = drain(loop.submit(prompt, SamplingParams(max_tokens=20)))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for outs in results.values():
        assert [t for o in outs for t in o.token_ids] == want.token_ids
        assert "".join(o.text for o in outs) == want.text
    s = loop.stats()
    assert s.finished == {"length": 12} and s.kv_blocks_used == 0 and s.generation_tokens == 12 * 20


def test_abort_ends_a_request_and_frees_its_blocks(loop, model):
    stream = loop.submit(model.tokenizer.encode("Tom"), SamplingParams(max_tokens=400, ignore_eos=True))
    it = iter(stream)
    first = next(it)
    assert first.token_ids and not first.finished
    loop.abort(stream.request_id)
    rest = list(it)
    assert rest[-1].finish_reason == "abort" and sum(o.finished for o in rest) == 1
    assert len(rest) < 399
    loop.abort(stream.request_id)                 # already ended: nothing happens
    assert drain(loop.submit([1, 50, 60], SamplingParams(max_tokens=2)))[-1].finish_reason == "length"
    assert loop.stats().kv_blocks_used == 0


def test_a_failing_step_fails_its_requests_and_the_loop_serves_on(model):
    loop = EngineLoop(model, RuntimeConfig(max_num_seqs=8))
    forward = loop.runner.backend.forward
    calls = {"n": 0}

    def flaky(batch, kv):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return forward(batch, kv)
    loop.runner.backend.forward = flaky
    streams = [loop.submit([1, 30 + i, 40], SamplingParams(max_tokens=10, ignore_eos=True)) for i in range(3)]
    loop.start()
    try:
        ends = [drain(s)[-1] for s in streams]
        assert {e.finish_reason for e in ends} == {"error"} and "boom" in ends[0].error
        after = drain(loop.submit([1, 5, 6], SamplingParams(max_tokens=4)))[-1]
        assert after.finish_reason == "length" and after.completion_tokens == 4
        assert loop.stats().kv_blocks_used == 0 and loop.crashed is None
    finally:
        loop.shutdown()


def test_a_stop_string_ends_the_request_in_the_step_it_completes(loop, model):
    prompt = model.tokenizer.encode("Once upon a time")
    full = generate(None, [prompt], SamplingParams(max_tokens=40), model=model).completions[0]
    stop = full.text[12:16]
    outs = drain(loop.submit(prompt, SamplingParams(max_tokens=40, stop=(stop,))))
    text = "".join(o.text for o in outs)
    assert text == full.text[:full.text.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    assert outs[-1].completion_tokens < len(full.token_ids)


def test_bad_requests_are_refused_at_submit_and_draining_takes_none(loop):
    with pytest.raises(ConfigError):
        loop.submit([], SamplingParams())
    with pytest.raises(ConfigError):
        loop.submit([1, 10**6], SamplingParams())
    loop.close_intake()
    with pytest.raises(Draining):
        loop.submit([1, 5], SamplingParams())
