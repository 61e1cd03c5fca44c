"""The paged KV cache: fixed-size blocks of keys and values per layer, and the block allocator
(free list, reference counts, prefix caching) that hands them to sequences."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Sequence

import torch


def block_hash(parent: bytes | None, tokens: Sequence[int], salt: str) -> bytes:
    """The key of a full block: its tokens, the key of the block before it (so a key names the whole
    prefix) and a salt (the KV format). A cryptographic digest, so two prefixes never share a key."""
    h = hashlib.blake2b(parent or salt.encode(), digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    """Blocks with reference counts, and prefix caching.

    A block is in one of three states: used (held by at least one request), cached (held by nobody
    but findable by the key of the prefix it holds, `register`ed when it filled) or free. Requests that
    share a prefix share its cached blocks (`lookup` takes a reference on each). A block whose count
    drops to zero stays cached; when no free block is left, `allocate` evicts the least recently
    released cached block. With caching off, nothing is registered and every released block is free."""

    def __init__(self, num_blocks: int, caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.caching = num_blocks, caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}                      # registered block -> its key
        self._block_of: dict[bytes, int] = {}                    # key -> registered block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently released first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks held by nobody that still hold a findable prefix."""
        return len(self._evictable)

    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out: the free ones and the cached ones it may evict."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.num_available

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, or None (and nothing taken) when fewer than n can be had."""
        if n > self.num_available:
            return None
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block, in order: release a request's table last block first, so
        its tail is evicted before the prefix other requests are likelier to share."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks holding the longest prefix of `keys`, a reference taken on each."""
        found = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
            found.append(b)
        return found

    def register(self, block: int, key: bytes) -> None:
        """`block` (held, full, never written again) holds the prefix named `key`: make it findable.
        A prefix already cached in another block keeps that one."""
        if self.caching and key not in self._block_of and block not in self._key_of:
            self._block_of[key], self._key_of[block] = block, key


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

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.spec.bytes_per_token
