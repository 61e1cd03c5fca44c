"""Fast CPU paged attention: decodes of the whole batch in one padded SDPA call, prefills one
sequence at a time through SDPA (causal flag when the whole context is new). Same contract and
results as `kernels.reference.attention.paged_attention` (tested for parity)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmc.kernels.reference import kv_quant


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: Tensor | None, v_scale: Tensor | None) -> None:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for x, cache, s in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = x.reshape(-1, kv_heads, head_dim)
        values = x.to(cache.dtype) if s is None else kv_quant.encode(x, s, cache.dtype)
        kv_quant.as_bytes(cache).view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, kv_quant.as_bytes(values))


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, batch,
                    num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                    sliding_window: int | None, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None) -> Tensor:
    write_kv(k, v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
    gqa = num_heads != num_kv_heads
    out = torch.empty_like(q)
    plan = batch.attention_plan(sliding_window)
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
