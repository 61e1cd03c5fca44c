"""The attention plan of one ragged batch (the triton kernel set's batch-preparation hook): the index
tensors every layer's attention kernels read, built once per step on the batch's device. Plain torch,
no triton: the plan is data, and tests compare it exactly.

The ragged batch (llmc.runtime.batch.RaggedBatch) is split in two launches: decode sequences (one
query each; one program per sequence and KV head) and prefill sequences (whole prompts or chunks of
them; one program per tile of PREFILL_BLOCK_M queries and per head)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREFILL_BLOCK_M = 16                       # queries per prefill program (older triton: tl.dot wants >= 16 rows)


@dataclass(frozen=True)
class AttentionPlan:
    q_start: Tensor                        # int32 [S] first row of each sequence in the batch
    q_len: Tensor                          # int32 [S] its new tokens this step
    ctx_len: Tensor                        # int32 [S] its tokens in the cache after this step
    block_tables: Tensor                   # int32 [S, max blocks] padded with 0 (never read past ctx_len)
    decode_seqs: Tensor                    # int32 [D] sequences with one query
    prefill_tiles: Tensor                  # int32 [P, 2] (sequence, first query of the tile)

    @property
    def num_decodes(self) -> int:
        return self.decode_seqs.numel()

    @property
    def num_prefill_tiles(self) -> int:
        return self.prefill_tiles.shape[0]


def build_plan(batch) -> AttentionPlan:
    """The plan of `batch` (a RaggedBatch), on `batch.device`."""
    starts, tiles, decodes = [], [], []
    row = 0
    for s, n in enumerate(batch.query_lens):
        starts.append(row)
        row += n
        if n == 1:
            decodes.append(s)
        else:
            tiles += [(s, m) for m in range(0, n, PREFILL_BLOCK_M)]
    width = max(len(t) for t in batch.block_tables)
    tables = [t + [0] * (width - len(t)) for t in batch.block_tables]

    def int32(x) -> Tensor:
        return torch.tensor(x, dtype=torch.int32, device=batch.device)

    return AttentionPlan(int32(starts), int32(batch.query_lens), int32(batch.context_lens), int32(tables),
                         int32(decodes), int32(tiles).reshape(-1, 2))
