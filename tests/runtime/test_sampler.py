"""The batched sampler against the per-row one, and the batch's index tensors against their definition."""
import torch

from llmc.runtime.batch import RaggedBatch
from llmc.runtime.sampler import SamplingParams, sample, sample_rows


def test_sample_rows_matches_sampling_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1          # a tie: the first index wins
    logits[4, 3] = float("nan")                                # a NaN: its index, as torch.argmax says
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=5),
              SamplingParams(), SamplingParams(), SamplingParams(temperature=1.2, top_p=0.9, seed=9)]
    rows = [0, 1, 2, 4, 5]                                     # row 3: a prefill chunk, nothing to sample
    got = sample_rows(logits, [(r, params[r], params[r].make_generator()) for r in rows])
    want = [sample(logits[r], params[r], params[r].make_generator()) for r in rows]
    assert got == want
    assert got[1] == 7 and got[3] == 3


def test_sample_rows_all_greedy_and_none():
    logits = torch.randn(3, 50)
    assert sample_rows(logits, [(r, SamplingParams(), None) for r in range(3)]) == logits.argmax(-1).tolist()
    assert sample_rows(logits, []) == []


def test_positions_and_slots_follow_the_block_tables():
    b = RaggedBatch(token_ids=list(range(7)), query_lens=[3, 1, 3], context_lens=[3, 6, 9],
                    block_tables=[[5], [2, 0], [1, 4, 3]], block_size=4)
    assert b.positions.tolist() == [0, 1, 2, 5, 6, 7, 8]
    # position p of a sequence lives in block table[p // 4], offset p % 4
    assert b.slot_mapping.tolist() == [20, 21, 22, 1, 4 * 4 + 2, 4 * 4 + 3, 3 * 4 + 0]
    assert b.positions.dtype == b.slot_mapping.dtype == torch.long
