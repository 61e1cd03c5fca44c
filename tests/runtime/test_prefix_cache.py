"""Prefix caching: the allocator's three block states and LRU eviction, and on the golden model that
a request sharing a prefix computes fewer tokens and gives exactly the tokens it gives without the cache."""
from __future__ import annotations

import random

import pytest

from llmc.loader import load_model
from llmc.runtime.kv_cache import BlockAllocator, block_hash
from llmc.runtime.runner import Runner, RuntimeConfig
from llmc.runtime.sampler import SamplingParams
from tests.helpers import STORIES


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES)


def test_blocks_are_used_cached_or_free_and_cached_ones_are_evicted_oldest_first():
    a = BlockAllocator(4)
    k = [block_hash(None, [i], "fp32") for i in range(4)]
    b = a.allocate(3)
    for block, key in zip(b, k):
        a.register(block, key)
    assert (a.num_used, a.num_cached, a.num_free) == (3, 0, 1)
    a.free([b[2], b[0]])                      # released: cached, b[2] first
    assert (a.num_used, a.num_cached, a.num_free) == (1, 2, 1)
    assert a.lookup([k[0], k[1], k[3]]) == [b[0], b[1]]        # the longest cached prefix, referenced
    assert (a.num_used, a.num_cached) == (2, 1)
    fresh = a.allocate(2)                     # the free block, then the oldest cached one: b[2]
    assert set(fresh) == {set(range(4)).difference(b).pop(), b[2]}
    assert a.lookup([k[2]]) == []             # evicted: no longer findable
    assert a.allocate(1) is None and a.num_available == 0
    a.free(fresh + [b[0], b[1], b[1]])
    assert (a.num_used, a.num_cached, a.num_free) == (0, 2, 2)


def test_a_prefix_is_registered_once_and_keys_name_the_whole_prefix():
    a = BlockAllocator(3)
    b = a.allocate(2)
    key = block_hash(None, [5, 6], "fp32")
    a.register(b[0], key)
    a.register(b[1], key)                     # the same prefix in a second block: the first keeps it
    a.free(b)
    assert (a.num_cached, a.num_free) == (1, 2)
    assert block_hash(key, [7], "fp32") != block_hash(block_hash(None, [9, 9], "fp32"), [7], "fp32")
    assert block_hash(None, [5, 6], "fp32") != block_hash(None, [5, 6], "int8")   # the KV format is in the key
    off = BlockAllocator(2, caching=False)
    off.register(off.allocate(1)[0], key)
    assert off.lookup([key]) == []


def run(model, prompts, caching: bool, **cfg) -> tuple[list[list[int]], Runner]:
    """Greedy tokens of each prompt, submitted one after another (each after the last finished)."""
    runner = Runner(model, RuntimeConfig(prefix_caching=caching, block_size=16, **cfg))
    outs = []
    for p in prompts:
        req = runner.add(p, SamplingParams(max_tokens=24, ignore_eos=True))
        while runner.has_work:
            runner.step()
        outs.append(req.output_ids)
    return outs, runner


def test_a_shared_200_token_prefix_is_not_recomputed_and_changes_no_token(model):
    r = random.Random(0)
    prefix = [1] + [r.randrange(3, 512) for _ in range(199)]
    prompts = [prefix + [r.randrange(3, 512) for _ in range(n)] for n in (0, 17, 40)]
    cached, runner = run(model, prompts, caching=True)
    plain, _ = run(model, prompts, caching=False)
    assert cached == plain
    # the second and third find the 12 full blocks of the prefix (192 tokens; the first prompt's
    # own outputs make more blocks, but the others' tokens differ after the prefix)
    assert runner.scheduler.num_prefix_hit_tokens == 2 * 192
    a = runner.scheduler.allocator
    assert a.num_used == 0 and a.num_cached + a.num_free == a.num_blocks and a.num_cached > 0


def test_the_same_prompt_again_computes_only_its_last_token(model):
    prompt = list(range(3, 3 + 64))           # 4 full blocks: the last token is computed again
    cached, runner = run(model, [prompt, prompt], caching=True)
    assert cached[0] == cached[1]
    assert runner.scheduler.num_prefix_hit_tokens == 48


def test_under_eviction_and_preemption_tokens_match_and_no_block_leaks(model):
    """Many requests sharing a few prefixes through a cache small enough to evict and preempt, all
    in flight together: every request's greedy tokens equal those without the cache."""
    r = random.Random(1)
    stems = [[1] + [r.randrange(3, 512) for _ in range(r.randrange(20, 60))] for _ in range(3)]
    prompts = [r.choice(stems) + [r.randrange(3, 512) for _ in range(r.randrange(1, 30))] for _ in range(24)]
    params = [SamplingParams(max_tokens=r.randrange(1, 30), ignore_eos=True) for _ in prompts]

    def together(caching):
        runner = Runner(model, RuntimeConfig(prefix_caching=caching, block_size=8, num_blocks=40,
                                             max_num_seqs=6, max_batched_tokens=64))
        reqs = [runner.add(p, q) for p, q in zip(prompts, params)]
        while runner.has_work:
            runner.step()
        return [q.output_ids for q in reqs], runner

    cached, runner = together(True)
    plain, _ = together(False)
    assert cached == plain
    s = runner.scheduler
    assert s.num_prefix_hit_tokens > 0 and s.num_preemptions > 0
    assert s.allocator.num_used == 0 and s.allocator.num_cached + s.allocator.num_free == 40


def test_abort_frees_a_request_s_blocks_at_once(model):
    runner = Runner(model, RuntimeConfig(block_size=8, num_blocks=30))
    a = runner.add(list(range(3, 40)), SamplingParams(max_tokens=20, ignore_eos=True))
    b = runner.add(list(range(5, 30)), SamplingParams(max_tokens=20, ignore_eos=True))
    runner.step()
    assert runner.scheduler.allocator.num_used > 0
    assert runner.finish(a.id, "abort") and runner.finish(b.id, "abort")
    assert not runner.finish(a.id, "abort")                  # already ended
    assert runner.scheduler.allocator.num_used == 0 and not runner.has_work
    assert a.finish_reason == b.finish_reason == "abort"
    c = runner.add(list(range(3, 12)), SamplingParams(max_tokens=5))
    runner.finish(c.id, "abort")                             # still waiting
    assert not runner.has_work and c.finish_reason == "abort"
