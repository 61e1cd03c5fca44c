"""The triton kernel set against its reference twins, on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, set before any triton kernel module is imported: triton reads it when
`@triton.jit` decorates). Odd shapes throughout (K not a multiple of 16, 1 / 3 / 17 / 70 rows, partial
int4 groups, head_dim 12), GQA, sliding windows, block tables with holes and spare entries, int8 and
fp8 KV caches, and decodes, whole prefills and prefill chunks mixed in one ragged batch."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton compiles any of our kernels

import random
from collections import Counter

import pytest
import torch

pytest.importorskip("triton", reason="the triton kernel set needs the triton package: pip install 'llmc[gpu]'")

import llmc.kernels.triton  # noqa: E402,F401  (registers the set)
from llmc.ir import OPS  # noqa: E402
from llmc.kernels import KERNEL_SETS, context, kernel_for  # noqa: E402
from llmc.kernels.reference.attention import write_kv as reference_write_kv  # noqa: E402
from llmc.kernels.triton import lazy  # noqa: E402
from llmc.kernels.triton.plan import build_plan  # noqa: E402
from llmc.quantized.formats import QuantizedWeight, TensorQuant, quantize  # noqa: E402
from llmc.runtime.batch import RaggedBatch  # noqa: E402
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache  # noqa: E402
from tests.tolerances import TOL  # noqa: E402

# Tolerances. Elementwise kernels (norms, rope, silu) use TOL[dtype]: the same fp32 operations as the
# reference, at most an ulp apart (rsqrt, exp). Kernels that reduce (matmuls, attention) add in
# another order (tiles, online softmax): a few fp32 ulps of the largest partial sums, an fp16 ulp.
REDUCTION = {torch.float32: dict(rtol=1e-5, atol=1e-5),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}
# Integer and byte outputs (KV-cache codes, the attention plan, fp8 decoding): exact, LSB budget 0.

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
T = "triton"


def run(op: str, impl: str, values, weights, batch=None, kv=None, used: Counter | None = None, **attrs):
    k = kernel_for(op, impl)
    w = k.prepare(tuple(weights), attrs) if k.prepare else tuple(weights)
    ctx = context(impl, batch, kv, used)
    ctx.op = op
    out = k.fn(ctx, *values, *w, **attrs)
    return out if isinstance(out, (tuple, list)) else (out,)


def check(op, values, weights, tol, batch=None, **attrs):
    """The reference and triton outputs of one op on the same inputs agree within `tol`."""
    ref = run(op, "reference", values, weights, batch, **attrs)
    got = run(op, T, values, weights, batch, **attrs)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype and b.shape == a.shape
        torch.testing.assert_close(b, a, **tol)


def test_the_set_registers_every_op_and_runs_on_the_interpreter():
    assert set(KERNEL_SETS[T].kernels) == set(OPS)
    lazy.module("norm")
    assert lazy._interpreted                                  # the kernels run as interpreted functions


# ------------------------------------------------------------------------------------------ norms

@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("width,group", [(96, 96), (128, 32), (77, 77), (36, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norms(rows, width, group, dtype):
    x = torch.randn(rows, width, generator=G(0)).to(dtype)
    r = torch.randn(rows, width, generator=G(1)).to(dtype)
    w = (1 + 0.3 * torch.randn(group, generator=G(2))).to(dtype)
    x[0] = 0                                                  # all-zero row: eps keeps it finite
    check("rms_norm", [x], [w], TOL[dtype], eps=1e-6, group=group)
    check("add_rms_norm", [x, r], [w], TOL[dtype], eps=0.25, group=group)   # an eps large enough to matter


def test_norm_of_a_strided_view():
    qkv = torch.randn(5, 64 + 32, generator=G(0))
    q = qkv[:, :64]                                           # rows 96 apart, as a split of a fused matmul
    check("rms_norm", [q], [torch.randn(16, generator=G(1))], TOL[torch.float32], eps=1e-6, group=16)


# ------------------------------------------------------------------------------------------- rope

@pytest.mark.parametrize("rope_type,extra", [("default", {}), ("linear", dict(factor=4.0)),
                                             ("llama3", dict(factor=8.0, original_max_positions=64))])
@pytest.mark.parametrize("head_dim,kv_heads", [(16, 2), (12, 1)])
def test_rope(rope_type, extra, head_dim, kv_heads):
    params = dict(theta=10000.0, rope_type=rope_type, factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_positions=0)
    params.update(extra)
    qkv = torch.randn(9, (4 + 2 * kv_heads) * head_dim, generator=G(0))
    q, k = qkv[:, :4 * head_dim], qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim]     # strided views
    pos = torch.tensor([0, 1, 2, 3, 500, 7, 8, 1000, 9])
    check("rope", [q, k, pos], [], TOL[torch.float32], head_dim=head_dim, **params)


def test_rope_in_fp16_and_one_row():
    params = dict(theta=500000.0, rope_type="default", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_positions=0)
    q, k = torch.randn(1, 3 * 8, generator=G(0)).half(), torch.randn(1, 8, generator=G(1)).half()
    check("rope", [q, k, torch.tensor([37])], [], TOL[torch.float16], head_dim=8, **params)


# ------------------------------------------------------------------------------------- activation

@pytest.mark.parametrize("rows,width", [(1, 5), (3, 172), (17, 1500)])        # 1500: two programs a row
def test_silu_mul(rows, width):
    gu = torch.randn(rows, 2 * width, generator=G(0)) * 4
    check("silu_mul", [gu[:, :width], gu[:, width:]], [], TOL[torch.float32])
    check("silu_mul", [gu[:, :width].half(), gu[:, width:].half()], [], TOL[torch.float16])


# ---------------------------------------------------------------------------------------- linears

INT4_SYM = TensorQuant(dtype="int4", granularity="group", group_size=32)
INT4_ASYM = TensorQuant(dtype="int4", granularity="group", group_size=32, symmetric=False)
WEIGHTS = {                                                   # name -> (weight format, input format)
    "float": (None, None),
    "int8": (TensorQuant(dtype="int8"), None),
    "int8-tensor": (TensorQuant(dtype="int8", granularity="tensor"), None),
    "int4-sym": (INT4_SYM, None),
    "int4-asym": (INT4_ASYM, None),
    "int4-g16-asym": (TensorQuant(dtype="int4", granularity="group", group_size=16, symmetric=False), None),
    "fp8": (TensorQuant(dtype="fp8_e4m3"), TensorQuant(dtype="fp8_e4m3", granularity="tensor")),
    "w8a8": (TensorQuant(dtype="int8"), TensorQuant(dtype="int8", granularity="token")),
    "w4a8": (INT4_SYM, TensorQuant(dtype="int8", granularity="group", group_size=32)),
    "w4a8-asym": (INT4_ASYM, TensorQuant(dtype="int8", granularity="group", group_size=32)),
}

DECODERS = {"float": "float", "int8": "int8", "int4": "int4", "fp8_e4m3": "fp8"}   # format -> in-kernel decoder


def make_weight(kind: str, n: int, k: int, seed: int = 4):
    w = torch.randn(n, k, generator=G(seed)) / k ** 0.5
    w[1] = 0                                                  # an all-zero row: scale 1, exact zeros
    fmt, act = WEIGHTS[kind]
    if fmt is None:
        return w
    qw = quantize(w, fmt)
    if act is None:
        return qw
    act_scale = torch.tensor([0.02]) if act.dtype == "fp8_e4m3" else None
    return QuantizedWeight(qw.fmt, qw.shape, qw.data, qw.scale, qw.zero, act, act_scale)


@pytest.mark.parametrize("kind", list(WEIGHTS))
@pytest.mark.parametrize("rows", [1, 4, 5, 70])               # GEMV up to 4 rows, then the GEMM
@pytest.mark.parametrize("k", [77, 40])                       # 77 = 2 * 32 + 13, 40 = 32 + 8: partial groups
def test_linear(kind, rows, k):
    x = torch.randn(rows, k, generator=G(3))
    w = make_weight(kind, 45, k)
    bias = torch.randn(45, generator=G(5))
    check("linear", [x], [w, bias], REDUCTION[torch.float32])
    used = Counter()
    run("linear", T, [x], [w], used=used)
    fmt = WEIGHTS[kind][0]
    decoder = DECODERS[fmt.dtype if fmt else "float"]
    assert list(used) == [("linear", f"triton {'GEMV' if rows <= 4 else 'GEMM'} ({decoder})")]


@pytest.mark.parametrize("kind", ["float", "int4-asym", "int8"])
@pytest.mark.parametrize("rows", [3, 17])
def test_linear_fp16(kind, rows):
    x = torch.randn(rows, 77, generator=G(3)).half()
    w = make_weight(kind, 45, 77)
    w = w.half() if kind == "float" else w
    check("linear", [x], [w, torch.randn(45, generator=G(5)).half()], REDUCTION[torch.float16])


@pytest.mark.parametrize("rows", [2, 130])
def test_every_fp8_weight_code_decodes_exactly(rows):
    """Weights holding every finite e4m3 byte (scale 1), times one-hot inputs: the products are the
    decoded values themselves, so the in-kernel decoder must agree with torch's exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].reshape(2, 127)
    fmt = TensorQuant(dtype="fp8_e4m3")
    w = QuantizedWeight(fmt, (2, 127), codes.view(torch.float8_e4m3fn), torch.ones(2, 1))
    x = torch.eye(127)[torch.arange(rows) % 127]
    y = run("linear", T, [x], [w])[0]
    want = codes.view(torch.float8_e4m3fn).float().T[torch.arange(rows) % 127]
    assert torch.equal(y, want)


@pytest.mark.parametrize("kind", ["float", "int4-sym", "w8a8"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linears(kind, bias):
    x = torch.randn(5, 48, generator=G(0))
    ws = [make_weight(kind, n, 48, seed=i) for i, n in enumerate((32, 16, 16))]
    bs = [torch.randn(n, generator=G(10 + i)) for i, n in enumerate((32, 16, 16))] if bias else []
    check("qkv_linear", [x], ws + bs, REDUCTION[torch.float32])
    check("gate_up_silu", [x], ws[1:], REDUCTION[torch.float32])


def test_logits_rows():
    h, w = torch.randn(6, 16, generator=G(0)), torch.randn(50, 16, generator=G(1))
    b = RaggedBatch(token_ids=[0] * 6, query_lens=[2, 3, 1], context_lens=[2, 3, 1],
                    block_tables=[[0], [1], [2]], block_size=4)
    check("logits", [h], [w], REDUCTION[torch.float32], b)
    every = RaggedBatch(token_ids=[0] * 6, query_lens=[6], context_lens=[6], block_tables=[[0, 1]], block_size=4,
                        all_logits=True)
    check("logits", [h], [w], REDUCTION[torch.float32], every)


def test_embed():
    table = torch.randn(40, 12, generator=G(0))
    tokens = torch.tensor([3, 0, 39, 3])
    check("embed", [tokens], [table], dict(rtol=0, atol=0))
    check("embed", [tokens], [quantize(table, TensorQuant(dtype="int8"))], dict(rtol=0, atol=0))


# -------------------------------------------------------------------------------- paged attention

def mixed_batch(block_size: int, seed: int = 0) -> RaggedBatch:
    """A whole prefill longer than a prefill tile (20 tokens), a chunk (4 new of 10), a long chunk
    (17 new of 45: two query tiles, two key tiles), decodes at 13, 3 and 40 tokens (40: two key
    tiles), interleaved; block tables scattered over a pool with blocks nobody holds between them,
    some tables longer than their sequence needs."""
    query_lens, context_lens, spare = [20, 4, 1, 1, 17, 1], [20, 10, 13, 3, 45, 40], [0, 1, 0, 2, 0, 1]
    need = [-(-c // block_size) + s for c, s in zip(context_lens, spare)]
    pool = list(range(sum(need) + 7))
    random.Random(seed).shuffle(pool)
    tables, at = [], 0
    for n in need:
        tables.append(pool[at:at + n])
        at += n
    return RaggedBatch(token_ids=[0] * sum(query_lens), query_lens=query_lens, context_lens=context_lens,
                       block_tables=tables, block_size=block_size)


def num_blocks(batch: RaggedBatch) -> int:
    return max(max(t) for t in batch.block_tables) + 8


def filled_cache(spec: KVCacheSpec, blocks: int, block_size: int, seed: int) -> PagedKVCache:
    """A cache whose every slot already holds values (the earlier context; garbage elsewhere)."""
    kv = PagedKVCache(spec, blocks, block_size)
    g = G(seed)
    for c in kv.k + kv.v:
        if spec.dtype == torch.int8:
            c.copy_(torch.randint(-127, 128, c.shape, generator=g, dtype=torch.int8))
        elif spec.dtype == torch.float8_e4m3fn:
            codes = torch.randint(0, 256, c.shape, generator=g).to(torch.uint8)
            codes[(codes & 0x7F) == 0x7F] = 0x38                     # no NaN codes: 1.0 instead
            c.view(torch.uint8).copy_(codes)
        else:
            c.normal_(generator=g)
    return kv


def copy_cache(kv: PagedKVCache) -> PagedKVCache:
    out = PagedKVCache(kv.spec, kv.num_blocks, kv.block_size)
    for a, b in zip(out.k + out.v, kv.k + kv.v):
        a.view(torch.uint8).copy_(b.view(torch.uint8)) if a.element_size() == 1 else a.copy_(b)
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


KV_DTYPES = {"fp32": torch.float32, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def test_the_attention_plan():
    b = RaggedBatch(token_ids=[0] * 21, query_lens=[1, 18, 2], context_lens=[5, 18, 9],
                    block_tables=[[7, 2], [0, 1, 3, 4, 5], [6, 8, 9]], block_size=4)
    p = build_plan(b)
    assert p.q_start.tolist() == [0, 1, 19] and p.q_len.tolist() == [1, 18, 2] and p.ctx_len.tolist() == [5, 18, 9]
    assert p.block_tables.tolist() == [[7, 2, 0, 0, 0], [0, 1, 3, 4, 5], [6, 8, 9, 0, 0]]
    assert p.decode_seqs.tolist() == [0] and p.prefill_tiles.tolist() == [[1, 0], [1, 16], [2, 0]]
    assert all(t.dtype == torch.int32 for t in (p.q_start, p.q_len, p.ctx_len, p.block_tables, p.decode_seqs))


HEADS = [(4, 2, 8), (4, 1, 12), (6, 2, 8), (4, 4, 16)]       # (heads, kv heads, head_dim): GQA 2, 4, 3, none
ATTENTION_CASES = ([(*h, window, "fp32") for h in HEADS for window in (None, 3, 17)]      # 17: past a key tile
                   + [(4, 2, 8, None, "int8"), (4, 1, 12, 17, "int8"), (6, 2, 8, 3, "int8"),
                      (4, 2, 8, 17, "fp8"), (4, 4, 16, None, "fp8"), (6, 2, 8, 3, "fp8")])


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,kv", ATTENTION_CASES)
def test_paged_attention(heads, kv_heads, head_dim, window, kv):
    block_size = 4 if head_dim != 12 else 5
    batch = mixed_batch(block_size)
    t = len(batch.token_ids)
    q = torch.randn(t, heads * head_dim, generator=G(0))
    kv_in = torch.randn(t, 2 * kv_heads * head_dim, generator=G(1))
    k, v = kv_in[:, :kv_heads * head_dim], kv_in[:, kv_heads * head_dim:]            # strided, as after a split
    dtype = KV_DTYPES[kv]
    scales = [] if dtype == torch.float32 else [0.02 + 0.01 * torch.rand(kv_heads, generator=G(s)) for s in (5, 6)]
    spec = KVCacheSpec(1, kv_heads, head_dim, dtype)
    ref_kv = filled_cache(spec, num_blocks(batch), block_size, seed=3)
    tri_kv = copy_cache(ref_kv)
    attrs = dict(layer=0, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=head_dim ** -0.5,
                 sliding_window=window)
    ref = run("attention", "reference", [q, k, v], scales, batch, ref_kv, **attrs)[0]
    got = run("attention", T, [q, k, v], scales, batch, tri_kv, **attrs)[0]
    torch.testing.assert_close(got, ref, **REDUCTION[torch.float32])
    assert torch.equal(as_bytes(tri_kv.k[0]), as_bytes(ref_kv.k[0]))             # the same bytes at the same slots
    assert torch.equal(as_bytes(tri_kv.v[0]), as_bytes(ref_kv.v[0]))


def test_paged_attention_fp16():
    batch = mixed_batch(16)
    t = len(batch.token_ids)
    q, k, v = (torch.randn(t, n * 16, generator=G(i)).half() for i, n in enumerate((4, 2, 2)))
    spec = KVCacheSpec(1, 2, 16, torch.float16)
    ref_kv = filled_cache(spec, num_blocks(batch), 16, seed=3)
    tri_kv = copy_cache(ref_kv)
    attrs = dict(layer=0, num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25, sliding_window=None)
    ref = run("attention", "reference", [q, k, v], [], batch, ref_kv, **attrs)[0]
    got = run("attention", T, [q, k, v], [], batch, tri_kv, **attrs)[0]
    torch.testing.assert_close(got, ref, **REDUCTION[torch.float16])
    assert torch.equal(tri_kv.k[0], ref_kv.k[0]) and torch.equal(tri_kv.v[0], ref_kv.v[0])


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_kv_write_rounds_like_the_reference(kv):
    """Codes of every tie and edge the encoders meet: int8 halves (round half to even) and saturation;
    every finite e4m3 value, every midpoint between neighbours, subnormals, +-0 and beyond +-448."""
    write_kv = lazy.module("kv_write").write_kv
    codes = torch.arange(256, dtype=torch.uint8)
    e4m3 = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn).float()
    positive = e4m3[e4m3 > 0].unique()
    mids = (positive[1:] + positive[:-1]) / 2
    values = torch.cat([e4m3, mids, -mids, torch.arange(-130, 131) + 0.5, torch.linspace(-0.03, 0.03, 601),
                        torch.tensor([0.0, -0.0, 448.0, -448.0, 500.0, -1e4, 127.4999, -127.5])])
    width = 8                                                        # 2 kv heads x 4
    values = torch.cat([values, torch.zeros(-len(values) % width)]).reshape(-1, width)
    scale = torch.tensor([1.0, 0.37])                                # head 1: codes of value / 0.37, IEEE division
    values[:, 4:] *= scale[1]
    dtype = KV_DTYPES[kv]
    slots = torch.randperm(values.shape[0] + 5, generator=G(0))[:values.shape[0]]
    caches = [torch.zeros(-(-(values.shape[0] + 5) // 4), 4, 2, 4, dtype=dtype) for _ in range(4)]
    reference_write_kv(values, -values, caches[0], caches[1], slots, scale, scale)
    write_kv(values, -values, caches[2], caches[3], slots, scale, scale)
    assert torch.equal(as_bytes(caches[2]), as_bytes(caches[0]))
    assert torch.equal(as_bytes(caches[3]), as_bytes(caches[1]))
