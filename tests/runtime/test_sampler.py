"""The batched sampler against the per-row one, penalties and log-probabilities against their
definitions, and the batch's index tensors against theirs."""
from dataclasses import dataclass, field

import pytest
import torch

from llmc.errors import OptionError
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.sampler import SamplingParams, apply_penalties, sample, sample_one, sample_rows


@dataclass
class State:                      # what the sampler reads of a request
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_ids: list = field(default_factory=list)
    output_ids: list = field(default_factory=list)

    def __post_init__(self):
        self.generator = self.params.make_generator()


def test_sample_rows_matches_sampling_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1          # a tie: the first index wins
    logits[4, 3] = float("nan")                                # a NaN: its index, as torch.argmax says
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=5),
              SamplingParams(), SamplingParams(), SamplingParams(temperature=1.2, top_p=0.9, seed=9)]
    rows = [0, 1, 2, 4, 5]                                     # row 3: a prefill chunk, nothing to sample
    got = [s.token_id for s in sample_rows(logits, [(r, State(params[r])) for r in rows])]
    want = [sample(logits[r], params[r], params[r].make_generator()) for r in rows]
    assert got == want
    assert got[1] == 7 and got[3] == 3


def test_sample_rows_all_greedy_and_none():
    logits = torch.randn(3, 50)
    got = sample_rows(logits, [(r, State(SamplingParams())) for r in range(3)])
    assert [s.token_id for s in got] == logits.argmax(-1).tolist()
    assert sample_rows(logits, []) == []


def test_positions_and_slots_follow_the_block_tables():
    b = RaggedBatch(token_ids=list(range(7)), query_lens=[3, 1, 3], context_lens=[3, 6, 9],
                    block_tables=[[5], [2, 0], [1, 4, 3]], block_size=4)
    assert b.positions.tolist() == [0, 1, 2, 5, 6, 7, 8]
    # position p of a sequence lives in block table[p // 4], offset p % 4
    assert b.slot_mapping.tolist() == [20, 21, 22, 1, 4 * 4 + 2, 4 * 4 + 3, 3 * 4 + 0]
    assert b.positions.dtype == b.slot_mapping.dtype == torch.long


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    got = apply_penalties(logits, p, prompt_ids=[1], output_ids=[3, 3, 0])
    # repetition over prompt and output ids {0, 1, 3}: positive / 2, negative * 2;
    # presence and frequency over the output only: 0 once, 3 twice
    want = torch.tensor([2.0 / 2 - 0.5 - 0.25, -1.0 * 2, 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0])
    assert torch.equal(got, want)
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))     # not changed in place
    assert apply_penalties(logits, SamplingParams(), [1], [3]) is logits


def test_a_penalty_changes_the_greedy_token():
    logits = torch.tensor([[0.0, 5.0, 4.9]])
    plain = sample_rows(logits, [(0, State(SamplingParams(), output_ids=[1]))])
    penal = sample_rows(logits, [(0, State(SamplingParams(frequency_penalty=1.0), output_ids=[1]))])
    assert plain[0].token_id == 1 and penal[0].token_id == 2


def test_logprobs_are_the_log_softmax_and_its_top_n():
    torch.manual_seed(1)
    logits = torch.randn(50)
    s = sample_one(logits, State(SamplingParams(logprobs=3)))
    lp = torch.log_softmax(logits, -1)
    assert s.token_id == int(lp.argmax()) and s.logprob == pytest.approx(float(lp.max()))
    top = torch.topk(lp, 3)
    assert [i for i, _ in s.top_logprobs] == top.indices.tolist()
    assert [v for _, v in s.top_logprobs] == pytest.approx(top.values.tolist())
    assert sample_one(logits, State(SamplingParams(logprobs=0))).top_logprobs == ()
    assert sample_one(logits, State(SamplingParams())).logprob is None


@pytest.mark.parametrize("bad", [dict(stop=("a", "b", "c", "d", "e")), dict(stop=("",)), dict(stop="END"), dict(logprobs=21),
                                 dict(logprobs=-1), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                                 dict(repetition_penalty=0.0), dict(stop_token_ids=(-1,))])
def test_bad_sampling_options_are_refused(bad):
    with pytest.raises(OptionError):
        SamplingParams(**bad)
