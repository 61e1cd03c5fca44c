"""In-flight batching through `generate`: batch results equal solo results; seeded sampling."""
from __future__ import annotations

import pytest
import torch

from llmc.generation import generate
from llmc.loader import load_model
from llmc.runtime.runner import RuntimeConfig
from llmc.runtime.sampler import SamplingParams, filter_logits
from tests.helpers import STORIES

PROMPTS = ["Once upon a time", "Tom", "The little dog ran to the park and saw a big red ball", "She",
           "One day, a girl named Sue went to the store with her mom to buy some",
           "The sun was very hot today", "Ben and Mia", "In a small house near the woods there lived an old cat"]


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES)


def test_eight_prompts_batched_equal_each_alone(model):
    params = SamplingParams(max_tokens=48)
    # a small token budget forces chunked prefills and staggered joins
    batched = generate(None, PROMPTS, params, RuntimeConfig(max_batched_tokens=20), model=model).completions
    for prompt, b in zip(PROMPTS, batched):
        alone = generate(None, [prompt], params, model=model).completions[0]
        assert b.token_ids == alone.token_ids, prompt
        assert b.text == alone.text and b.finish_reason == alone.finish_reason
    assert len({len(model.tokenizer.encode(p)) for p in PROMPTS}) == 8    # really different lengths


def test_sequences_leave_the_batch_independently(model):
    params = SamplingParams(max_tokens=30)
    short = SamplingParams(max_tokens=3)
    from llmc.runtime.runner import Runner
    runner = Runner(model, RuntimeConfig())
    a = runner.add(model.tokenizer.encode(PROMPTS[0]), params)
    b = runner.add(model.tokenizer.encode(PROMPTS[1]), short)
    batch_sizes = []
    while runner.has_work:
        batch_sizes.append(len(runner.step()))
        if len(batch_sizes) == 5:                                     # a third joins mid-flight
            c = runner.add(model.tokenizer.encode(PROMPTS[2]), short)
    assert batch_sizes[:3] == [2, 2, 2] and batch_sizes[3] == 1 and batch_sizes[5] == 2
    assert len(a.output_ids) == 30 and len(b.output_ids) == 3 and len(c.output_ids) == 3


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    one = generate(None, PROMPTS[:3], params, model=model).completions
    two = generate(None, PROMPTS[:3], params, model=model).completions
    alone = generate(None, [PROMPTS[1]], params, model=model).completions[0]
    assert [c.token_ids for c in one] == [c.token_ids for c in two]
    assert one[1].token_ids == alone.token_ids
    other = generate(None, PROMPTS[:1], SamplingParams(max_tokens=24, temperature=0.9, seed=99), model=model)
    greedy = generate(None, PROMPTS[:1], SamplingParams(max_tokens=24), model=model)
    assert other.completions[0].token_ids != greedy.completions[0].token_ids or \
        one[0].token_ids != greedy.completions[0].token_ids


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, None, 0.5)).tolist() == [False, True, True, True]
    assert torch.isinf(filter_logits(logits, None, 0.81)).tolist() == [False, False, False, True]


def test_max_model_len_stops_with_length(model, tmp_path):
    ids = model.tokenizer.encode(PROMPTS[0])
    out = generate(None, [ids + [261] * (512 - len(ids) - 3)], SamplingParams(max_tokens=50, ignore_eos=True),
                   model=model).completions[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
