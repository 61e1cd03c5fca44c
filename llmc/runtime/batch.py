"""The ragged batch: the tokens of several sequences flattened into one tensor.

Each sequence contributes `query_len` new tokens (a whole prompt, a chunk of one, or one decode
token) at the end of its `context_len` tokens, whose keys and values live in the paged KV cache at
the blocks of its block table. Slot of position p = table[p // block_size] * block_size + p % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor


class AttentionPlan(NamedTuple):
    decode_rows: Tensor | None            # [B] rows of single-token sequences
    decode_blocks: Tensor | None          # [B * nb] their block tables, padded to nb blocks each
    decode_mask: Tensor | None            # [B, 1, 1, nb * block_size] True where a key is visible
    prefills: list[tuple[int, int, Tensor, Tensor | None]]   # (start, n, blocks, mask or None=causal)


@dataclass
class RaggedBatch:
    token_ids: list[int]
    query_lens: list[int]
    context_lens: list[int]               # tokens in the cache for each sequence after this step
    block_tables: list[list[int]]
    block_size: int
    all_logits: bool = False              # logits for every token (perplexity), not just the last
    _plans: dict = field(default_factory=dict, repr=False)

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
        return torch.tensor(self.token_ids, dtype=torch.long)

    @cached_property
    def positions(self) -> Tensor:
        return torch.cat([torch.arange(c - n, c) for n, c in zip(self.query_lens, self.context_lens)])

    def _slots(self, table: list[int], start: int, stop: int) -> Tensor:
        pos = torch.arange(start, stop)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    @cached_property
    def slot_mapping(self) -> Tensor:
        return torch.cat([self._slots(t, c - n, c)
                          for n, c, t in zip(self.query_lens, self.context_lens, self.block_tables)])

    @cached_property
    def logit_rows(self) -> Tensor | None:
        if self.all_logits:
            return None
        return torch.tensor(self.query_lens, dtype=torch.long).cumsum(0) - 1

    def attention_plan(self, sliding_window: int | None) -> AttentionPlan:
        """Index tensors for the fast attention kernel; built once per step and window size."""
        if sliding_window not in self._plans:
            self._plans[sliding_window] = self._build_plan(sliding_window)
        return self._plans[sliding_window]

    def _build_plan(self, window: int | None) -> AttentionPlan:
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        decodes = [i for i, n in enumerate(self.query_lens) if n == 1]
        bs = self.block_size
        rows = blocks = mask = None
        if decodes:
            nb = max(-(-self.context_lens[i] // bs) for i in decodes)
            blocks = torch.zeros(len(decodes), nb, dtype=torch.long)          # padding reads block 0, masked
            mask = torch.zeros(len(decodes), 1, 1, nb * bs, dtype=torch.bool)
            for j, i in enumerate(decodes):
                length = self.context_lens[i]
                table = self.block_tables[i][: -(-length // bs)]
                blocks[j, : len(table)] = torch.tensor(table, dtype=torch.long)
                lo = 0 if window is None else max(0, length - window)
                mask[j, 0, 0, lo:length] = True
            rows = torch.tensor([starts[i] for i in decodes], dtype=torch.long)
            blocks = blocks.reshape(-1)
        prefills = []
        for i, (n, length) in enumerate(zip(self.query_lens, self.context_lens)):
            if n == 1:
                continue
            full_causal = n == length and (window is None or window >= length)
            m = None
            if not full_causal:
                j = torch.arange(length)[None, :]
                pos = torch.arange(length - n, length)[:, None]
                m = j <= pos
                if window is not None:
                    m &= j > pos - window
            table = torch.tensor(self.block_tables[i][: -(-length // bs)], dtype=torch.long)
            prefills.append((starts[i], n, table, m))
        return AttentionPlan(rows, blocks, mask, prefills)
