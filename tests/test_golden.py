"""The real golden model: the same greedy continuation through the HF directory, its compiled
engine and transformers; and the author's documented sample."""
from __future__ import annotations

import pytest
import torch

from llmc.generation import generate
from llmc.loader import load_model
from llmc.runtime.runner import RuntimeConfig
from llmc.runtime.sampler import SamplingParams
from tests.helpers import STORIES

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine(stories_engine):
    return stories_engine


@pytest.fixture(scope="module")
def transformers_greedy():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(STORIES)
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=100, do_sample=False)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist(), tok


def test_tokenizer_matches_transformers(transformers_greedy):
    ids, _, tok = transformers_greedy
    model = load_model(STORIES)
    assert model.tokenizer.encode(PROMPT) == ids == [1, 403, 407, 261, 378]
    for text in ["", "  double  spaces ", "\nleading newline", "Lily's mom said, \"Hi!\" 123", "日本語 🙂"]:
        assert model.tokenizer.encode(text) == tok(text).input_ids, repr(text)


@pytest.mark.parametrize("kernels", ["cpu", "reference", "native"])
def test_same_greedy_continuation_everywhere(engine, transformers_greedy, kernels):
    ids, expected, tok = transformers_greedy
    params = SamplingParams(max_tokens=100)
    from_hf = generate(STORIES, [PROMPT], params, RuntimeConfig(kernels=kernels)).completions[0]
    from_engine = generate(engine, [PROMPT], params, RuntimeConfig(kernels=kernels)).completions[0]
    assert from_hf.token_ids == from_engine.token_ids == expected
    assert from_hf.text == from_engine.text == tok.decode(ids + expected, skip_special_tokens=True)[len(PROMPT):]


def test_documented_sample_from_bos():
    """llama2.c's doc/stories260K.md greedy sample from BOS alone begins with these ids."""
    out = generate(STORIES, [[1]], SamplingParams(max_tokens=12)).completions[0]
    assert out.token_ids == [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421]
    text = generate(STORIES, [PROMPT], SamplingParams(max_tokens=40)).completions[0].text
    assert text.startswith(", there was a little girl named Lily. She loved to play outside in the park.")
