"""Every kernel set's kernels against their reference twins, with explicit tolerances. Parametrized
over every registered kernel set but the reference, so a new set is tested by registering it."""
from __future__ import annotations

import pytest
import torch

from llmc.ir import OPS
from llmc.kernels import KERNEL_SETS, context, kernel_for
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from tests.helpers import fast_kernel_sets
from tests.tolerances import TOL

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


FAST = fast_kernel_sets()
fast_sets = pytest.mark.parametrize("impl", FAST)


def run(op: str, impl: str, values, weights, batch=None, kv=None, **attrs):
    k = kernel_for(op, impl)
    w = k.prepare(tuple(weights), attrs) if k.prepare else tuple(weights)
    out = k.fn(context(impl, batch, kv), *values, *w, **attrs)
    return out if isinstance(out, (tuple, list)) else (out,)


def both(op, impl, values, weights, batch=None, **attrs):
    """(reference outputs, `impl` outputs) of one op on the same inputs."""
    return run(op, "reference", values, weights, batch, **attrs), run(op, impl, values, weights, batch, **attrs)


def test_every_kernel_set_has_every_op():
    assert "reference" in KERNEL_SETS and FAST
    for name, ks in KERNEL_SETS.items():
        assert set(ks.kernels) == set(OPS), name


@fast_sets
@pytest.mark.parametrize("width,group", [(96, 96), (128, 32), (5, 5)])
def test_norms(impl, width, group):
    x, r = torch.randn(7, width, generator=G(0)), torch.randn(7, width, generator=G(1))
    w = torch.randn(group, generator=G(2))
    x[0] = 0                                                          # all-zero row: eps keeps it finite
    for (ref, cpu) in (both("rms_norm", impl, [x], [w], eps=1e-6, group=group),
                       both("add_rms_norm", impl, [x, r], [w], eps=1e-5, group=group)):
        for a, b in zip(ref, cpu):
            torch.testing.assert_close(b, a, **TOL[torch.float32])


@fast_sets
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linears(impl, bias):
    x = torch.randn(5, 48, generator=G(0))
    ws = [torch.randn(n, 48, generator=G(i)) for i, n in enumerate((32, 16, 16))]
    bs = [torch.randn(w.shape[0], generator=G(10 + i)) for i, w in enumerate(ws)] if bias else []
    ref, cpu = both("qkv_linear", impl, [x], ws + bs)
    for a, b in zip(ref, cpu):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)       # summation order differs: reduction atol
    ref, cpu = both("gate_up_silu", impl, [x], ws[1:])
    torch.testing.assert_close(cpu[0], ref[0], rtol=1e-5, atol=1e-5)
    ref, cpu = both("linear", impl, [x], ws[:1] + bs[:1])
    torch.testing.assert_close(cpu[0], ref[0], rtol=1e-5, atol=1e-5)
    ref, cpu = both("silu_mul", impl, [ws[1], ws[2]], [])
    torch.testing.assert_close(cpu[0], ref[0], **TOL[torch.float32])


@fast_sets
@pytest.mark.parametrize("rope_type,extra", [("default", {}), ("linear", dict(factor=4.0)),
                                             ("llama3", dict(factor=8.0, original_max_positions=64))])
def test_rope(impl, rope_type, extra):
    params = dict(theta=10000.0, rope_type=rope_type, factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_positions=0)
    params.update(extra)
    q, k = torch.randn(9, 4 * 16, generator=G(0)), torch.randn(9, 2 * 16, generator=G(1))
    pos = torch.tensor([0, 1, 2, 3, 500, 7, 8, 1000, 9])
    ref, cpu = both("rope", impl, [q, k, pos], [], head_dim=16, **params)
    for a, b in zip(ref, cpu):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def mixed_batch():
    """Two whole prefills of different lengths, one prefill chunk (context already cached) and
    two decodes, with block tables scattered over the pool."""
    return RaggedBatch(
        token_ids=list(range(5 + 9 + 4 + 1 + 1)),
        query_lens=[5, 9, 4, 1, 1], context_lens=[5, 9, 10, 13, 3],
        block_tables=[[3, 8], [0, 6, 11], [1, 2, 9], [4, 5, 7, 10], [12]], block_size=4)


@fast_sets
@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_paged_attention(impl, window, heads, kv_heads):
    d = 8
    batch = mixed_batch()
    t = len(batch.token_ids)
    q = torch.randn(t, heads * d, generator=G(0))
    k, v = torch.randn(t, kv_heads * d, generator=G(1)), torch.randn(t, kv_heads * d, generator=G(2))
    spec = KVCacheSpec(1, kv_heads, d)
    caches = []
    for name in ("reference", impl):
        kv = PagedKVCache(spec, num_blocks=13, block_size=4)
        prefill = torch.Generator().manual_seed(3)                   # identical earlier context in both caches
        kv.k[0].normal_(generator=prefill)
        kv.v[0].normal_(generator=prefill)
        out = run("attention", name, [q, k, v], [], batch, kv, layer=0, num_heads=heads, num_kv_heads=kv_heads,
                  head_dim=d, scale=d ** -0.5, sliding_window=window)[0]
        caches.append((out, kv))
    (ref, kv_ref), (cpu, kv_cpu) = caches
    torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kv_ref.k[0], kv_cpu.k[0]) and torch.equal(kv_ref.v[0], kv_cpu.v[0])   # same slots written


@fast_sets
def test_logits_rows(impl):
    h, w = torch.randn(6, 16, generator=G(0)), torch.randn(50, 16, generator=G(1))
    b = RaggedBatch(token_ids=[0] * 6, query_lens=[2, 3, 1], context_lens=[2, 3, 1],
                    block_tables=[[0], [1], [2]], block_size=4)
    ref, cpu = both("logits", impl, [h], [w], b)
    torch.testing.assert_close(cpu[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref[0], h[[1, 4, 5]] @ w.T, rtol=1e-5, atol=1e-5)
