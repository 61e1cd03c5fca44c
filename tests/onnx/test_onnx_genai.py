"""ONNX Runtime GenAI generates from an onnx engine unchanged (its genai_config.json, model.onnx and
the tokenizer files): on both golden models its greedy tokens equal `llmc generate`'s, for prompts
of several lengths run one at a time and as one left-padded batch."""
from __future__ import annotations

import json

import pytest

from llmc.compiler import compile
from llmc.generation import generate
from llmc.loader import load_model
from llmc.runtime.sampler import SamplingParams
from tests.helpers import GOLDEN, STORIES

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the dev extra) is not installed")

PROMPTS = ["Once upon a time", "Tom and his dog went to the park. They", "The sun"]
NEW_TOKENS = 40


def genai_greedy(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = og.Model(str(engine))
    out = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens,
                                  do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(ids)
        while not g.is_done():
            g.generate_next_token()
        out.append([int(t) for t in g.get_sequence(0)][len(ids):])
    return out


@pytest.mark.parametrize("golden", [STORIES, GOLDEN / "stdlib-llama"], ids=lambda p: p.name)
def test_onnxruntime_genai_generates_llmc_s_tokens(tmp_path, golden):
    engine = tmp_path / "onnx.engine"
    compile(golden, engine, target="onnx")
    config = json.loads((engine / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    tok = load_model(engine).tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]          # GenAI's tokenizer adds no BOS: the same ids to both
    want = generate(engine, prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)).completions
    got = genai_greedy(engine, prompts, NEW_TOKENS)
    assert got == [c.token_ids for c in want]
