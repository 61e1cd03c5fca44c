"""Fast CPU paged attention: decodes of the whole batch in one padded SDPA call, prefills one
sequence at a time through SDPA (causal flag when the whole context is new). Same contract and
results as `kernels.reference.attention.paged_attention` (tested for parity)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.reshape(-1, kv_heads, head_dim).to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.reshape(-1, kv_heads, head_dim).to(v_cache.dtype))


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, batch,
                    num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                    sliding_window: int | None) -> Tensor:
    write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    gqa = num_heads != num_kv_heads
    out = torch.empty_like(q)
    plan = batch.attention_plan(sliding_window)
    if plan.decode_rows is not None:                              # every single-token sequence at once
        b = plan.decode_rows.numel()
        qd = q.index_select(0, plan.decode_rows).view(b, num_heads, 1, head_dim)
        keys = k_flat[plan.decode_slots].to(q.dtype).transpose(1, 2)       # [B, KV, Lmax, d]
        vals = v_flat[plan.decode_slots].to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=plan.decode_mask, scale=scale,
                                           enable_gqa=gqa)
        out.index_copy_(0, plan.decode_rows, o.reshape(b, num_heads * head_dim))
    for start, n, slots, mask in plan.prefills:                   # longer chunks one by one
        qs = q[start:start + n].view(n, num_heads, head_dim).transpose(0, 1).unsqueeze(0)
        keys = k_flat[slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
        vals = v_flat[slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=gqa)
        out[start:start + n] = o.squeeze(0).transpose(0, 1).reshape(n, num_heads * head_dim)
    return out
