"""A mixed ragged batch gives each sequence the logits it gets alone; blocks never leak."""
from __future__ import annotations

import random

import pytest

from llmc.loader import load_model
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from llmc.runtime.runner import Runner, RuntimeConfig
from llmc.runtime.sampler import SamplingParams
from tests.helpers import backend, STORIES, forward_all, make_checkpoint
from tests.tolerances import RAGGED_VS_ALONE_ATOL


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def random_model(request, tmp_path_factory):
    extra = dict(num_attention_heads=8, num_key_value_heads=2) if request.param == "llama" else dict(head_dim=32)
    path, _ = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3, **extra)
    return load_model(path)


def seq(n: int, seed: int, vocab: int = 512) -> list[int]:
    r = random.Random(seed)
    return [1] + [r.randrange(3, vocab) for _ in range(n - 1)]


def mixed_vs_alone(model, kernels: str) -> list[float]:
    """Max abs logit difference per sequence: mixed ragged batch vs the sequence alone."""
    a = model.arch
    ex = backend(model, kernels)
    kv = PagedKVCache(KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim), num_blocks=40, block_size=4)
    A, B, C, D, E = (seq(n, i, a.vocab_size) for i, n in enumerate((7, 12, 16, 10, 5)))
    tables = {"A": [0, 1], "B": [2, 3, 4], "C": [5, 6, 7, 8], "D": [9, 10, 11], "E": [12, 13]}
    # Earlier steps put C's first 10 tokens, D's first 9 and E's first 4 into the cache.
    ex.forward(RaggedBatch(C[:10] + D[:9] + E[:4], [10, 9, 4], [10, 9, 4],
                           [tables["C"], tables["D"], tables["E"]], 4), kv)
    # Two whole prefills of different lengths (A, B), a prefill chunk (C), two decodes (D, E).
    mixed = RaggedBatch(token_ids=A + B + C[10:] + D[9:] + E[4:], query_lens=[7, 12, 6, 1, 1],
                        context_lens=[7, 12, 16, 10, 5],
                        block_tables=[tables[k] for k in "ABCDE"], block_size=4)
    out = ex.forward(mixed, kv)
    return [(out[row] - forward_all(model, s, kernels, executor=ex)[-1]).abs().max().item()
            for row, s in enumerate((A, B, C, D, E))]


@pytest.mark.parametrize("kernels", ["cpu", "reference", "native"])
def test_mixed_batch_matches_each_sequence_alone(random_model, kernels):
    errs = mixed_vs_alone(random_model, kernels)
    assert max(errs) <= RAGGED_VS_ALONE_ATOL, [f"{e:.2e}" for e in errs]


@pytest.mark.parametrize("kernels", ["cpu", "reference", "native"])
def test_mixed_batch_on_the_golden_model(model, kernels):
    # The golden model's logits reach |15|, where fp32 GEMMs of different row counts differ by
    # ~10 ULP (~1e-5) even with the reference kernels: the bound scales with the logits.
    errs = mixed_vs_alone(model, kernels)
    assert max(errs) <= 2 * RAGGED_VS_ALONE_ATOL, [f"{e:.2e}" for e in errs]


def test_no_block_leaks_after_many_sequences(model):
    """60 requests of random lengths through a cache small enough to force preemption."""
    runner = Runner(model, RuntimeConfig(num_blocks=24, block_size=8, max_num_seqs=6, max_batched_tokens=64))
    r = random.Random(0)
    reqs = [runner.add(seq(r.randrange(2, 60), i), SamplingParams(max_tokens=r.randrange(1, 40), ignore_eos=True))
            for i in range(60)]
    steps = 0
    while runner.has_work:
        runner.step()
        steps += 1
        assert steps < 10_000
    assert runner.scheduler.allocator.num_available == 24
    assert all(len(q.output_ids) == q.params.max_tokens and q.finish_reason == "length" for q in reqs)
    assert sum(q.num_preemptions for q in reqs) > 0          # the small cache really was contended
    assert not runner.scheduler.requests and not runner.scheduler.running
