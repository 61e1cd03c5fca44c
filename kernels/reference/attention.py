"""Reference paged attention: write this step's keys and values into the paged KV cache, then run
causal attention for each sequence of the ragged batch on its own, gathering its keys and values
block by block through its block table."""
from __future__ import annotations

import torch
from torch import Tensor

from llmc.kernels.reference import kv_quant


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """k, v [T, kv_heads * head_dim] go to slots (block * block_size + offset) of the caches
    [num_blocks, block_size, kv_heads, head_dim], quantized per KV head when scales are given."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = x.reshape(-1, kv_heads, head_dim)
        values = x.to(cache.dtype) if scale is None else kv_quant.encode(x, scale, cache.dtype)
        kv_quant.as_bytes(cache).view(-1, kv_heads, head_dim)[slot_mapping] = kv_quant.as_bytes(values)


def gather_kv(cache: Tensor, block_table: list[int], length: int, scale: Tensor | None = None) -> Tensor:
    """The first `length` cached positions of one sequence -> [length, kv_heads, head_dim] (fp32
    when the cache is quantized)."""
    blocks = kv_quant.as_bytes(cache)[torch.tensor(block_table, dtype=torch.long)].view(cache.dtype)
    values = blocks.reshape(-1, cache.shape[2], cache.shape[3])[:length]
    return values if scale is None else kv_quant.decode(values, scale, kv_axis=1)


def causal_mask(q_positions: Tensor, length: int, sliding_window: int | None) -> Tensor:
    """[n_q, length] True where query (at its absolute position) may see key j."""
    j = torch.arange(length)[None, :]
    pos = q_positions[:, None]
    allowed = j <= pos
    if sliding_window is not None:
        allowed &= j > pos - sliding_window
    return allowed


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                    query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                    num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                    sliding_window: int | None, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None) -> Tensor:
    """q [T, heads * d], k/v [T, kv_heads * d] -> [T, heads * d]."""
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    out = torch.empty_like(q)
    group = num_heads // num_kv_heads
    start = 0
    for n, length, table in zip(query_lens, context_lens, block_tables):
        qs = q[start:start + n].reshape(n, num_heads, head_dim).transpose(0, 1)            # [H, n, d]
        keys = gather_kv(k_cache, table, length, k_scale).to(q.dtype).transpose(0, 1)       # [KV, L, d]
        vals = gather_kv(v_cache, table, length, v_scale).to(q.dtype).transpose(0, 1)
        keys = keys.repeat_interleave(group, dim=0)                                         # [H, L, d]
        vals = vals.repeat_interleave(group, dim=0)
        scores = (qs @ keys.transpose(1, 2)) * scale                                        # [H, n, L]
        mask = causal_mask(torch.arange(length - n, length), length, sliding_window)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[start:start + n] = (probs @ vals).transpose(0, 1).reshape(n, num_heads * head_dim)
        start += n
    return out
