"""The paged KV cache: fixed-size blocks of keys and values per layer, and the block allocator
(free list + reference counts) that hands them to sequences."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


class BlockAllocator:
    """Free list of block ids with reference counts; a block returns to the free list at count 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()


class PagedKVCache:
    """k[layer], v[layer]: [num_blocks, block_size, kv_heads, head_dim] on `device` (the backend's)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        self.device = torch.device(device)
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=self.device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=self.device) for _ in range(spec.num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.spec.bytes_per_token
