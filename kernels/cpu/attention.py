"""Fast CPU paged attention: decodes of the whole batch in one padded SDPA call, prefills one
sequence at a time through SDPA (causal flag when the whole context is new). Same results as
`kernels.reference.attention.paged_attention` (tested for parity). The index tensors it needs are
built once per step from the ragged batch (`AttentionPlans`, the cpu kernel set's batch-preparation
hook) and shared by every layer."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from llmc.kernels.reference import kv_quant


class AttentionPlan(NamedTuple):
    decode_rows: Tensor | None            # [B] rows of single-token sequences
    decode_blocks: Tensor | None          # [B * nb] their block tables, padded to nb blocks each
    decode_mask: Tensor | None            # [B, 1, 1, nb * block_size] True where a key is visible
    prefills: list[tuple[int, int, Tensor, Tensor | None]]   # (start, n, blocks, mask or None=causal)


class AttentionPlans:
    """The attention plans of one ragged batch, one per sliding-window size, built on first use."""

    def __init__(self, batch) -> None:
        self.batch, self._plans = batch, {}

    def plan(self, window: int | None) -> AttentionPlan:
        if window not in self._plans:
            self._plans[window] = build_plan(self.batch, window)
        return self._plans[window]


def build_plan(batch, window: int | None) -> AttentionPlan:
    """Which rows decode (and their padded block tables and masks) and where each prefill chunk
    starts, for a ragged batch (llmc.runtime.batch.RaggedBatch), on the batch's device."""
    starts = [0]
    for n in batch.query_lens:
        starts.append(starts[-1] + n)
    decodes = [i for i, n in enumerate(batch.query_lens) if n == 1]
    bs, device = batch.block_size, batch.device
    rows = blocks = mask = None
    if decodes:
        nb = max(-(-batch.context_lens[i] // bs) for i in decodes)
        blocks = torch.zeros(len(decodes), nb, dtype=torch.long)          # padding reads block 0, masked
        mask = torch.zeros(len(decodes), 1, 1, nb * bs, dtype=torch.bool)
        for j, i in enumerate(decodes):
            length = batch.context_lens[i]
            table = batch.block_tables[i][: -(-length // bs)]
            blocks[j, : len(table)] = torch.tensor(table, dtype=torch.long)
            lo = 0 if window is None else max(0, length - window)
            mask[j, 0, 0, lo:length] = True
        rows = torch.tensor([starts[i] for i in decodes], dtype=torch.long, device=device)
        blocks, mask = blocks.reshape(-1).to(device), mask.to(device)
    prefills = []
    for i, (n, length) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if n == 1:
            continue
        full_causal = n == length and (window is None or window >= length)
        m = None
        if not full_causal:
            j = torch.arange(length, device=device)[None, :]
            pos = torch.arange(length - n, length, device=device)[:, None]
            m = j <= pos
            if window is not None:
                m &= j > pos - window
        table = torch.tensor(batch.block_tables[i][: -(-length // bs)], dtype=torch.long, device=device)
        prefills.append((starts[i], n, table, m))
    return AttentionPlan(rows, blocks, mask, prefills)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: Tensor | None, v_scale: Tensor | None) -> None:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for x, cache, s in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = x.reshape(-1, kv_heads, head_dim)
        values = x.to(cache.dtype) if s is None else kv_quant.encode(x, s, cache.dtype)
        kv_quant.as_bytes(cache).view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, kv_quant.as_bytes(values))


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                    plan: AttentionPlan, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                    k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> Tensor:
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    gqa = num_heads != num_kv_heads
    out = torch.empty_like(q)
    if plan.decode_rows is not None:                              # every single-token sequence at once
        b = plan.decode_rows.numel()
        every_row = b == q.shape[0]                               # a pure decode step: no select/scatter
        qd = (q if every_row else q.index_select(0, plan.decode_rows)).view(b, num_heads, 1, head_dim)
        keys = _gather(k_cache, plan.decode_blocks, b, q.dtype, k_scale)         # [B, KV, nb * bs, d]
        vals = _gather(v_cache, plan.decode_blocks, b, q.dtype, v_scale)
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=plan.decode_mask, scale=scale,
                                           enable_gqa=gqa)
        if every_row:
            return o.reshape(b, num_heads * head_dim)
        out.index_copy_(0, plan.decode_rows, o.reshape(b, num_heads * head_dim))
    for start, n, blocks, mask in plan.prefills:                  # longer chunks one by one
        length = mask.shape[-1] if mask is not None else n
        qs = q[start:start + n].view(n, num_heads, head_dim).transpose(0, 1).unsqueeze(0)
        keys = _gather(k_cache, blocks, 1, q.dtype, k_scale)[..., :length, :]
        vals = _gather(v_cache, blocks, 1, q.dtype, v_scale)[..., :length, :]
        o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=gqa)
        out[start:start + n] = o.squeeze(0).transpose(0, 1).reshape(n, num_heads * head_dim)
    return out


def _gather(cache: Tensor, blocks: Tensor, b: int, dtype: torch.dtype, scale: Tensor | None) -> Tensor:
    """Whole blocks of the cache [num_blocks, bs, KV, d] -> [b, KV, blocks/b * bs, d], widened with
    the per-head scales when the cache is quantized."""
    g = kv_quant.as_bytes(cache).index_select(0, blocks).view(cache.dtype)
    g = g.view(b, -1, cache.shape[2], cache.shape[3]).transpose(1, 2)
    return g.to(dtype) if scale is None else kv_quant.decode(g, scale, kv_axis=1).to(dtype)
