"""Scheduler policies on plain data: no model needed."""
from __future__ import annotations

import random

from llmc.runtime.kv_cache import BlockAllocator
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.scheduler import Scheduler, SchedulerConfig, Status


def make_scheduler(num_blocks=4, block_size=4, max_batched_tokens=64, max_num_seqs=16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
                                     block_size=block_size), BlockAllocator(num_blocks))


def execute(s: Scheduler, plan, sampled: dict[str, int]) -> None:
    """What the runner does after the forward: advance and append sampled tokens."""
    for rid, n in plan.num_tokens.items():
        req = s.requests[rid]
        req.num_computed += n
        if req.pending == 0:
            req.output_ids.append(sampled.get(rid, 7))


P = SamplingParams(max_tokens=100)


def test_newest_request_is_preempted_when_kv_is_full():
    s = make_scheduler(num_blocks=4, block_size=4)
    a, b = s.add([1] * 8, P), s.add([2] * 8, P)                  # two blocks each: the pool is full
    plan = s.step()
    assert plan.num_tokens == {a.id: 8, b.id: 8}
    execute(s, plan, {})
    plan = s.step()                                              # both now need a third block
    assert plan.preempted == [b.id] and plan.num_tokens == {a.id: 1}
    assert b.status is Status.WAITING and b.num_computed == 0 and s.waiting[0] is b


def test_chunked_prefill_under_token_budget():
    s = make_scheduler(num_blocks=16, block_size=4, max_batched_tokens=10)
    a, b = s.add([1] * 25, P), s.add([2] * 3, P)
    assert s.step().num_tokens == {a.id: 10}
    a.num_computed = 10
    assert s.step().num_tokens == {a.id: 10}
    a.num_computed = 20
    plan = s.step()
    assert plan.num_tokens == {a.id: 5, b.id: 3}                  # the tail of a's prompt and all of b's


def test_max_num_seqs_limits_admission():
    s = make_scheduler(num_blocks=64, max_num_seqs=2)
    reqs = [s.add([1, 2, 3], P) for _ in range(3)]
    assert list(s.step().num_tokens) == [reqs[0].id, reqs[1].id]
    assert s.waiting[0] is reqs[2]


def test_random_workload_loses_and_duplicates_nothing():
    rng = random.Random(1)
    s = make_scheduler(num_blocks=12, block_size=4, max_batched_tokens=16, max_num_seqs=5)
    want = {}
    for _ in range(40):
        req = s.add([rng.randrange(100) for _ in range(rng.randrange(1, 20))],
                    SamplingParams(max_tokens=rng.randrange(1, 12)))
        want[req.id] = req
    finished, steps = [], 0
    while s.has_work:
        plan = s.step()
        steps += 1
        assert steps < 5000
        assert len(set(plan.num_tokens)) == len(plan.num_tokens)
        assert sum(plan.num_tokens.values()) <= 16
        used = [b for r in s.running for b in r.block_table]
        assert len(used) == len(set(used)) and len(used) + s.allocator.num_free == 12
        for rid, n in plan.num_tokens.items():
            req = s.requests[rid]
            assert req.status is Status.RUNNING and 0 < n <= req.pending
            assert len(req.block_table) * 4 >= req.num_computed + n
        execute(s, plan, {})
        for req in list(s.running):
            if len(req.output_ids) >= req.params.max_tokens:
                s.finish(req, "length")
                finished.append(req.id)
    assert sorted(finished) == sorted(want) and len(finished) == len(set(finished))
    assert all(len(r.output_ids) == r.params.max_tokens for r in want.values())
    assert s.allocator.num_free == 12
