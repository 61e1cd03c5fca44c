"""config.json parsing and BOS/EOS handling, on hand-written configs."""
from __future__ import annotations

import json
import shutil

import pytest

from llmc.arch import parse_arch
from llmc.errors import ModelFormatError, UnsupportedModelError
from llmc.tokenizer import Tokenizer
from tests.helpers import STORIES, write_word_tokenizer

BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8}


def test_defaults_and_derived_fields():
    a = parse_arch(BASE)
    assert a.num_kv_heads == 8 and a.head_dim == 8 and a.rope.rope_type == "default" and a.rope.theta == 10000.0
    assert a.sliding_windows == (None, None) and not a.tie_word_embeddings


def test_family_switches():
    assert parse_arch({**BASE, "model_type": "qwen2"}).qkv_bias
    assert not parse_arch({**BASE, "model_type": "qwen2"}).o_bias
    q3 = parse_arch({**BASE, "model_type": "qwen3", "attention_bias": True})
    assert q3.qk_norm and q3.qkv_bias and q3.o_bias
    assert parse_arch({**BASE, "model_type": "mistral", "sliding_window": 4096}).sliding_windows == (4096, 4096)
    q2 = parse_arch({**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
                     "max_window_layers": 1})
    assert q2.sliding_windows == (None, 64)


@pytest.mark.parametrize("cfg,error,message", [
    ({**BASE, "model_type": "gpt2"}, UnsupportedModelError, "supported: llama, mistral, qwen2, qwen3"),
    ({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4}}, UnsupportedModelError, "rope type 'yarn'"),
    ({**BASE, "rope_scaling": {"type": "llama3", "factor": 8}}, ModelFormatError, "low_freq_factor"),
    ({**BASE, "hidden_act": "gelu"}, UnsupportedModelError, "hidden_act"),
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, ModelFormatError, "hidden_size"),
    ({**BASE, "num_key_value_heads": 3}, ModelFormatError, "multiple"),
])
def test_bad_configs(cfg, error, message):
    with pytest.raises(error, match=message):
        parse_arch(cfg)


def test_explicit_add_bos_false_and_eos_lists(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    write_word_tokenizer(d, 50)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False, "add_eos_token": True}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    t = Tokenizer(d)
    assert t.encode("w5 w6") == [5, 6, 2]
    assert t.info.eos_token_ids == (2, 7)


def test_post_processor_decides_when_config_is_silent(tmp_path):
    d = tmp_path / "stories"
    shutil.copytree(STORIES, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"], cfg["add_eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(d).encode("Once upon a time") == [1, 403, 407, 261, 378]     # tokenizer.json adds <s>


def test_no_tokenizer_means_token_ids_only(tmp_path):
    t = Tokenizer(tmp_path)
    assert not t.available
    with pytest.raises(ModelFormatError, match="token ids"):
        t.encode("hello")
