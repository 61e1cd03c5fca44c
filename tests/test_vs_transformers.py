"""Loaders checked against transformers on randomly initialised configs (fp32): prefill logits,
16 incremental decode steps through the paged KV cache, and `llmc generate --temperature 0`."""
from __future__ import annotations

import json

import pytest
import torch

from llmc.cli import main
from llmc.loader import load_model
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from tests.helpers import backend, forward_all, make_checkpoint
from tests.tolerances import MODEL_VS_TRANSFORMERS_ATOL

LLAMA3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}

CASES = {
    "llama-gqa1": ("llama", 0, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa4-llama3-headdim": ("llama", 1, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                                  rope_parameters=LLAMA3)),
    "llama-linear-bias-tied": ("llama", 2, dict(rope_parameters=LINEAR, attention_bias=True, mlp_bias=True,
                                               tie_word_embeddings=True, num_hidden_layers=3)),
    "mistral-gqa4-window": ("mistral", 3, dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=7)),
    "mistral-nowindow-llama3": ("mistral", 4, dict(sliding_window=None, rope_parameters=LLAMA3, head_dim=32)),
    "qwen2-gqa4-tied": ("qwen2", 5, dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-sliding-layers": ("qwen2", 6, dict(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                            num_hidden_layers=3)),
    "qwen3-gqa1-headdim": ("qwen3", 7, dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32)),
    "qwen3-gqa4-bias-llama3": ("qwen3", 8, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                               attention_bias=True, rope_parameters=LLAMA3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, seed, overrides = CASES[request.param]
    path, hf = make_checkpoint(tmp_path_factory.mktemp(request.param), model_type, seed=seed, **overrides)
    return path, hf, load_model(path)


def prompt_ids(n: int, seed: int, vocab: int = 1000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


@torch.no_grad()
def test_prefill_logits_match(case):
    path, hf, model = case
    ids = prompt_ids(23, 0)
    ref = hf(torch.tensor([ids])).logits[0]
    for kernels in ("cpu", "reference", "native"):
        ours = forward_all(model, ids, kernels)
        err = (ours - ref).abs().max().item()
        assert err <= MODEL_VS_TRANSFORMERS_ATOL, f"{kernels}: max abs {err:.2e}"


@torch.no_grad()
@pytest.mark.parametrize("kernels", ["cpu", "native"])
def test_incremental_decode_matches(case, kernels):
    """Prefill 11 tokens, then 16 single-token steps through the paged cache (block size 4, blocks
    deliberately out of order), each against transformers' logits at that position."""
    path, hf, model = case
    a = model.arch
    ids = prompt_ids(11, 1)
    for _ in range(16):                                   # transformers' greedy continuation
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    ref = hf(torch.tensor([ids])).logits[0]
    ex = backend(model, kernels)
    kv = PagedKVCache(KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim), num_blocks=12, block_size=4)
    table = [9, 2, 7, 0, 11, 4, 5, 1]
    n0 = 11
    out = ex.forward(RaggedBatch(ids[:n0], [n0], [n0], [table], 4), kv)
    assert (out[0] - ref[n0 - 1]).abs().max().item() <= MODEL_VS_TRANSFORMERS_ATOL
    for pos in range(n0, len(ids)):
        out = ex.forward(RaggedBatch([ids[pos]], [1], [pos + 1], [table], 4), kv)
        err = (out[0] - ref[pos]).abs().max().item()
        assert err <= MODEL_VS_TRANSFORMERS_ATOL, f"decode step at position {pos}: max abs {err:.2e}"


@torch.no_grad()
def test_cli_greedy_generate_matches_transformers(case, capsys):
    path, hf, model = case
    prompt = "w5 w17 w300 w42 w999 w8 w123"
    ids = model.tokenizer.encode(prompt)
    assert ids == [1, 5, 17, 300, 42, 999, 8, 123]
    expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    main(["generate", str(path), "--prompt", prompt, "--temperature", "0", "--max-tokens", "16", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result[0]["token_ids"] == expected
    assert result[0]["finish_reason"] == ("stop" if expected[-1] == 2 else "length")


def test_legacy_rope_layout_is_read(tmp_path):
    """The long-standing layout: top-level rope_theta + rope_scaling {"type": ...}."""
    path, hf = make_checkpoint(tmp_path, "llama", seed=9, rope_parameters=LLAMA3)
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(path)
    assert model.arch.rope.rope_type == "llama3" and model.arch.rope.theta == 50000.0
    ids = prompt_ids(40, 2)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (forward_all(model, ids) - ref).abs().max().item() <= MODEL_VS_TRANSFORMERS_ATOL


def test_sharded_checkpoint_loads(tmp_path):
    path, hf = make_checkpoint(tmp_path / "a", "qwen2", seed=10)
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = load_model(tmp_path / "sharded")
    ids = prompt_ids(9, 3)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (forward_all(model, ids) - ref).abs().max().item() <= MODEL_VS_TRANSFORMERS_ATOL
