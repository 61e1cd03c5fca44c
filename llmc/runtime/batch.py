"""The ragged batch: the tokens of several sequences flattened into one tensor.

Each sequence contributes `query_len` new tokens (a whole prompt, a chunk of one, or one decode
token) at the end of its `context_len` tokens, whose keys and values live in the paged KV cache at
the blocks of its block table. Slot of position p = table[p // block_size] * block_size + p % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class RaggedBatch:
    token_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]               # tokens in the cache for each sequence after this step
    block_tables: list[list[int]]
    block_size: int
    all_logits: bool = False              # logits for every token (perplexity), not just the last
    device: torch.device | str = "cpu"    # where its index tensors live: the backend's device

    def __post_init__(self) -> None:
        assert len(self.query_lens) == len(self.context_lens) == len(self.block_tables)
        assert sum(self.query_lens) == len(self.token_ids)
        for n, length, table in zip(self.query_lens, self.context_lens, self.block_tables):
            assert 0 < n <= length <= len(table) * self.block_size, (n, length, len(table))

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @cached_property
    def tokens(self) -> Tensor:
        return torch.tensor(self.token_ids, dtype=torch.long, device=self.device)

    # positions and slots are built as Python lists and made a tensor once: per-sequence torch ops
    # cost ~35 us a sequence, a tenth of a batch-32 decode step's time outside the model
    @cached_property
    def positions(self) -> Tensor:
        pos = [p for n, c in zip(self.query_lens, self.context_lens) for p in range(c - n, c)]
        return torch.tensor(pos, dtype=torch.long, device=self.device)

    @cached_property
    def slot_mapping(self) -> Tensor:
        bs = self.block_size
        slots = [t[p // bs] * bs + p % bs
                 for n, c, t in zip(self.query_lens, self.context_lens, self.block_tables) for p in range(c - n, c)]
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    @cached_property
    def logit_rows(self) -> Tensor | None:
        if self.all_logits:
            return None
        return (torch.tensor(self.query_lens, dtype=torch.long).cumsum(0) - 1).to(self.device)
