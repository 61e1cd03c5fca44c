"""Paged attention in Triton, the twin of kernels/reference/attention.py: write this step's keys and
values into the paged KV cache (kernels/triton/kv_write.py), then causal attention for every sequence
of the ragged batch, reading its keys and values through its block table inside the kernel.

Two kernels over one attention plan (kernels/triton/plan.py, built once per step):
- decode (one query per sequence): one program per sequence and KV head, serving the query heads of
  that KV head (GQA) so each key and value is read once; the heads are the rows of a tl.dot, padded
  to 16 (older triton releases want 16 rows; the padding rows are zeros, never stored);
- prefill (whole prompts and chunks of them, the context before the chunk already cached): one
  program per tile of PREFILL_BLOCK_M queries and per head, scores and the weighted sum on tl.dot.
Both stream the context BLOCK_N positions at a time (position j lives at slot table[j // block_size]
* block_size + j % block_size) with an online softmax in fp32, skip the positions a sliding window
hides, and decode int8 / fp8 e4m3 caches in the kernel with the per-KV-head scales (the decoded
values rounded to q's dtype, as the reference does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels.triton.formats import e4m3_to_float
from llmc.kernels.triton.kv_write import CODES, write_kv
from llmc.kernels.triton.lazy import check_device
from llmc.kernels.triton.linear import dot_precision
from llmc.kernels.triton.plan import PREFILL_BLOCK_M, AttentionPlan

DECODE_BLOCK_N = 32                       # context positions per decode iteration
PREFILL_BLOCK_N = 32                      # context positions per prefill iteration (tl.dot: >= 16)
NUM_WARPS = 8                             # with these tiles and head_dim 128: no register spills (ptxas, sm_80)


@triton.jit
def _kv_tile(cache_ptr, scale_ptr, table_ptr, j, valid, kvh, d, d_mask, block_size, blk_stride, off_stride,
             head_stride, CODE: tl.constexpr, DTYPE: tl.constexpr):
    """The cached keys (or values) of positions j [BLOCK_N] for KV head kvh -> [BLOCK_N, BLOCK_D] of
    DTYPE, 0 where not valid: each position's block looked up in the sequence's block table."""
    blk = tl.load(table_ptr + j // block_size, mask=valid, other=0).to(tl.int64)
    ptr = cache_ptr + blk[:, None] * blk_stride + (j % block_size)[:, None] * off_stride + kvh * head_stride
    raw = tl.load(ptr + d[None, :], mask=valid[:, None] & d_mask[None, :], other=0)
    if CODE == "int8":
        val = raw.to(tl.float32) * tl.load(scale_ptr + kvh)
    elif CODE == "fp8":
        val = e4m3_to_float(raw) * tl.load(scale_ptr + kvh)
    else:
        val = raw
    return val.to(DTYPE)


@triton.jit
def _decode_kernel(q_ptr, o_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, tables_ptr, seqs_ptr, q_start_ptr, ctx_len_ptr,
                   table_stride, q_stride, o_stride, blk_stride, off_stride, head_stride, block_size, group,
                   head_dim, scale, window, CODE: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.load(seqs_ptr + tl.program_id(0))
    kvh = tl.program_id(1)
    row = tl.load(q_start_ptr + seq).to(tl.int64)
    length = tl.load(ctx_len_ptr + seq)
    table = tables_ptr + seq.to(tl.int64) * table_stride
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_off = (kvh * group + g)[:, None] * head_dim + d[None, :]          # the query heads of this KV head
    q_mask = (g < group)[:, None] & d_mask[None, :]                     # rows past the group: zeros
    q = tl.load(q_ptr + row * q_stride + q_off, mask=q_mask, other=0.0)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(length - window, 0)                             # the query sits at length - 1
    m_i = tl.full([BLOCK_G], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j0 in range((lo // BLOCK_N) * BLOCK_N, length, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = (j >= lo) & (j < length)
        k = _kv_tile(kc_ptr, ks_ptr, table, j, valid, kvh, d, d_mask, block_size, blk_stride, off_stride,
                     head_stride, CODE, q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale                           # [G, N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = _kv_tile(vc_ptr, vs_ptr, table, j, valid, kvh, d, d_mask, block_size, blk_stride, off_stride,
                     head_stride, CODE, q.dtype)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + row * o_stride + q_off, out.to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _prefill_kernel(q_ptr, o_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, tables_ptr, tiles_ptr, q_start_ptr, q_len_ptr,
                    ctx_len_ptr, table_stride, q_stride, o_stride, blk_stride, off_stride, head_stride, block_size,
                    group, head_dim, scale, window, CODE: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, h = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    m0 = tl.load(tiles_ptr + 2 * tile + 1)
    n = tl.load(q_len_ptr + seq)
    length = tl.load(ctx_len_ptr + seq)
    rows = tl.load(q_start_ptr + seq).to(tl.int64) + m0 + tl.arange(0, BLOCK_M)
    table = tables_ptr + seq.to(tl.int64) * table_stride
    kvh = h // group
    mi = m0 + tl.arange(0, BLOCK_M)
    pos = length - n + mi                                              # the queries' absolute positions
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_mask = (mi < n)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + rows[:, None] * q_stride + h * head_dim + d[None, :], mask=q_mask, other=0.0)
    hi = tl.minimum(length - n + m0 + BLOCK_M, length)                 # past the tile's last query
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(length - n + m0 - window + 1, 0)               # the first query's window
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = (j >= lo) & (j < hi)
        k = _kv_tile(kc_ptr, ks_ptr, table, j, valid, kvh, d, d_mask, block_size, blk_stride, off_stride,
                     head_stride, CODE, q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale                          # [M, N]
        seen = valid[None, :] & (j[None, :] <= pos[:, None])
        if HAS_WINDOW:
            seen = seen & (j[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = _kv_tile(vc_ptr, vs_ptr, table, j, valid, kvh, d, d_mask, block_size, blk_stride, off_stride,
                     head_stride, CODE, q.dtype)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                  # rows past the sequence: not stored
    tl.store(o_ptr + rows[:, None] * o_stride + h * head_dim + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=q_mask)


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                    plan: AttentionPlan, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                    sliding_window: int | None, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None) -> Tensor:
    """q [T, heads * d], k / v [T, kv_heads * d] -> [T, heads * d]: k, v written at their slots, then
    each query attends to its sequence's cached positions up to its own (within the window)."""
    check_device(q, k_cache)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    code = CODES.get(k_cache.dtype, "float")
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if code == "fp8" else (k_cache, v_cache)
    ks, vs = (k_scale, v_scale) if code != "float" else (q, q)           # unused pointers for a float cache
    group = num_heads // num_kv_heads
    common = (kc, vc, ks, vs, plan.block_tables)
    layout = (plan.block_tables.stride(0), q.stride(0), out.stride(0), k_cache.stride(0), k_cache.stride(1),
               k_cache.stride(2), k_cache.shape[1], group, head_dim, float(scale), sliding_window or 0)
    meta = dict(CODE=code, HAS_WINDOW=sliding_window is not None, PRECISION=dot_precision(q.dtype),
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    if plan.num_decodes:
        _decode_kernel[(plan.num_decodes, num_kv_heads)](
            q, out, *common, plan.decode_seqs, plan.q_start, plan.ctx_len, *layout, **meta,
            BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=DECODE_BLOCK_N, num_warps=NUM_WARPS)
    if plan.num_prefill_tiles:
        _prefill_kernel[(plan.num_prefill_tiles, num_heads)](
            q, out, *common, plan.prefill_tiles, plan.q_start, plan.q_len, plan.ctx_len, *layout, **meta,
            BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, num_warps=NUM_WARPS)
    return out
