"""A soak: thousands of requests with random prompts, lengths, sampling options and stop strings, a
random tenth cancelled by the client mid-stream, through a KV cache small enough to preempt and evict.
Afterwards every request that was not cancelled ended exactly once, no KV block is held, and cached
plus free blocks are all the blocks. LLMC_SOAK_REQUESTS sets the size (2,000 by default)."""
from __future__ import annotations

import asyncio
import json
import os
import random

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llmc.runtime.runner import RuntimeConfig
from tests.helpers import STORIES
from tests.server.conftest import running

REQUESTS = int(os.environ.get("LLMC_SOAK_REQUESTS", "2000"))
CONCURRENCY = 32
WORDS = ["the", "a", "dog", "cat", "sun", "ran", "happy", "big", "tree", "ball", "mom", "and", "."]


def random_body(r: random.Random, stems: list[list[int]]) -> dict:
    if r.random() < 0.3:
        prompt = " ".join(r.choice(WORDS) for _ in range(r.randrange(1, 40)))
    else:
        prompt = r.choice(stems)[:r.randrange(1, 150)] + [r.randrange(3, 512) for _ in range(r.randrange(0, 40))]
    body = {"prompt": prompt, "max_tokens": r.randrange(1, 64), "stream": r.random() < 0.8}
    if r.random() < 0.5:
        body.update(temperature=r.choice([0.5, 1.0, 1.5]), seed=r.randrange(1000))
        if r.random() < 0.5:
            body["top_k"] = r.randrange(1, 50)
        if r.random() < 0.5:
            body["top_p"] = r.uniform(0.5, 1.0)
    else:
        body["temperature"] = 0
    if r.random() < 0.3:
        body["stop"] = r.sample(WORDS, r.randrange(1, 4))
    if r.random() < 0.2:
        body.update(presence_penalty=r.uniform(-1, 1), frequency_penalty=r.uniform(0, 1),
                    repetition_penalty=r.uniform(0.8, 1.5))
    if r.random() < 0.2:
        body["logprobs"] = r.randrange(0, 5)
    if r.random() < 0.3:
        body["ignore_eos"] = True
    if body["stream"] and r.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    return body


async def one(client: httpx.AsyncClient, body: dict, cancel_after: int | None) -> dict:
    """The request's outcome: how many final chunks and [DONE] lines it saw, or that it was cancelled."""
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return {"finals": int(choice["finish_reason"] is not None), "done": 1, "cancelled": False}
    finals = done = chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done += 1
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                finals += c["finish_reason"] is not None
                chunks += 1
            if cancel_after is not None and chunks >= cancel_after and not finals:
                return {"cancelled": True}                 # leaving the block closes the connection
    return {"finals": finals, "done": done, "cancelled": False}


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_soak(stories_model):
    r = random.Random(2026)
    stems = [[1] + [r.randrange(3, 512) for _ in range(150)] for _ in range(4)]
    bodies = [random_body(r, stems) for _ in range(REQUESTS)]
    cancels = [r.randrange(1, 8) if b["stream"] and r.random() < 0.1 else None for b in bodies]
    runtime = RuntimeConfig(max_num_seqs=16, max_batched_tokens=256, num_blocks=80, block_size=16)
    with running(STORIES, model=stories_model, runtime=runtime, max_queue=4 * REQUESTS) as s:
        async def soak():
            sem = asyncio.Semaphore(CONCURRENCY)
            async with httpx.AsyncClient(base_url=s.url, timeout=300,
                                         limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
                async def bounded(body, cancel):
                    async with sem:
                        return await one(client, body, cancel)
                return await asyncio.gather(*(bounded(b, c) for b, c in zip(bodies, cancels)))
        outcomes = asyncio.run(soak())
        loop = s.state.loop
        for _ in range(500):                               # the last aborts reach the loop
            if loop.idle:
                break
            asyncio.run(asyncio.sleep(0.01))
        m = metrics(s.url)
        allocator = loop.runner.scheduler.allocator
        total = m["llmc_kv_blocks_total{}"]
        assert m["llmc_kv_blocks_used{}"] == 0
        assert m["llmc_kv_blocks_cached{}"] + allocator.num_free == total == 80
        finished = {k: v for k, v in m.items() if k.startswith("llmc_requests_finished_total")}
        assert sum(finished.values()) == REQUESTS                      # every request ended exactly once
        assert m["llmc_prefix_cache_hit_tokens_total{}"] > 0 and m["llmc_preemptions_total{}"] > 0
    cancelled = sum(o["cancelled"] for o in outcomes)
    assert 0 < cancelled and finished['llmc_requests_finished_total{"finish_reason": "abort"}'] <= cancelled
    for o in outcomes:
        if not o["cancelled"]:
            assert o["finals"] == 1 and o["done"] == 1, o
