"""config.json / engine-manifest architecture and tokenizer ids: wrong types, nonsense sizes and
unbounded values are user errors naming the file and the field, found before anything is built."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from llmc.arch import MAX_LAYERS, ArchConfig, parse_arch
from llmc.errors import LlmcError, ModelFormatError, UnsupportedModelError
from llmc.inspection import _describe
from llmc.tokenizer import Tokenizer
from tests.helpers import GOLDEN, STORIES

GOLDEN_CFG = json.loads((STORIES / "config.json").read_text())          # llama, head_dim 8, rope_parameters
LEGACY = {k: v for k, v in GOLDEN_CFG.items() if k not in ("rope_parameters", "head_dim")}   # top-level rope_theta


def qwen2(**kw):
    return {**GOLDEN_CFG, "model_type": "qwen2", **kw}


def mistral(**kw):
    return {**GOLDEN_CFG, "model_type": "mistral", **kw}


BAD_CONFIGS = {     # name: (config, field the message must name)
    "layers huge": ({**GOLDEN_CFG, "num_hidden_layers": 10_000_000}, "num_hidden_layers"),
    "layers huge mistral": (mistral(num_hidden_layers=10**18, sliding_window=8), "num_hidden_layers"),
    "layers negative": ({**GOLDEN_CFG, "num_hidden_layers": -1}, "num_hidden_layers"),
    "layers zero": ({**GOLDEN_CFG, "num_hidden_layers": 0}, "num_hidden_layers"),
    "layers float": ({**GOLDEN_CFG, "num_hidden_layers": 2.5}, "num_hidden_layers"),
    "layers integral float": ({**GOLDEN_CFG, "num_hidden_layers": 5.0}, "num_hidden_layers"),
    "layers string": ({**GOLDEN_CFG, "num_hidden_layers": "5"}, "num_hidden_layers"),
    "layers bool": ({**GOLDEN_CFG, "num_hidden_layers": True}, "num_hidden_layers"),
    "heads zero": ({**GOLDEN_CFG, "num_attention_heads": 0}, "num_attention_heads"),
    "heads huge": ({**GOLDEN_CFG, "num_attention_heads": 4096, "num_key_value_heads": 4096}, "num_attention_heads"),
    "kv heads zero": ({**GOLDEN_CFG, "num_key_value_heads": 0}, "num_key_value_heads"),
    "kv heads not dividing": ({**GOLDEN_CFG, "num_key_value_heads": 3}, "num_key_value_heads"),
    "positions zero": ({**GOLDEN_CFG, "max_position_embeddings": 0}, "max_position_embeddings"),
    "positions huge": ({**GOLDEN_CFG, "max_position_embeddings": 2**40}, "max_position_embeddings"),
    "intermediate negative": ({**GOLDEN_CFG, "intermediate_size": -172}, "intermediate_size"),
    "intermediate huge": ({**GOLDEN_CFG, "intermediate_size": 2**30}, "intermediate_size"),
    "hidden huge": ({**GOLDEN_CFG, "hidden_size": 2**20}, "hidden_size"),
    "vocab string": ({**GOLDEN_CFG, "vocab_size": "512"}, "vocab_size"),
    "vocab huge": ({**GOLDEN_CFG, "vocab_size": 2**40}, "vocab_size"),
    "vocab enormous int": ({**GOLDEN_CFG, "vocab_size": 10**5000}, "vocab_size"),
    "vocab null": ({**GOLDEN_CFG, "vocab_size": None}, "vocab_size"),
    "head_dim huge": ({**GOLDEN_CFG, "head_dim": 4096}, "head_dim"),
    "head_dim odd": ({**GOLDEN_CFG, "head_dim": 7}, "head_dim"),
    "hidden not whole heads": ({**LEGACY, "num_attention_heads": 6, "num_key_value_heads": 6}, "hidden_size"),
    "eps zero": ({**GOLDEN_CFG, "rms_norm_eps": 0}, "rms_norm_eps"),
    "eps negative": ({**GOLDEN_CFG, "rms_norm_eps": -1e-5}, "rms_norm_eps"),
    "eps nan": ({**GOLDEN_CFG, "rms_norm_eps": math.nan}, "rms_norm_eps"),
    "eps inf": ({**GOLDEN_CFG, "rms_norm_eps": math.inf}, "rms_norm_eps"),
    "eps string": ({**GOLDEN_CFG, "rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "theta zero": ({**LEGACY, "rope_theta": 0}, "rope_theta"),
    "theta negative": ({**LEGACY, "rope_theta": -10000.0}, "rope_theta"),
    "theta nan": ({**LEGACY, "rope_theta": math.nan}, "rope_theta"),
    "theta inf in rope_parameters": ({**GOLDEN_CFG, "rope_parameters": {"rope_theta": math.inf}}, "rope_theta"),
    "theta overflowing int": ({**LEGACY, "rope_theta": 10**400}, "rope_theta"),
    "rope factor zero": ({**GOLDEN_CFG, "rope_parameters": {"rope_type": "linear", "factor": 0}}, "factor"),
    "rope factor negative": ({**LEGACY, "rope_scaling": {"type": "linear", "factor": -2.0}}, "factor"),
    "llama3 factors equal": ({**GOLDEN_CFG, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}, "high_freq_factor"),
    "llama3 zero original positions": ({**GOLDEN_CFG, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 0}}, "original_max_position_embeddings"),
    "rope_parameters list": ({**GOLDEN_CFG, "rope_parameters": [1, 2]}, "rope_parameters"),
    "rope_parameters string": ({**GOLDEN_CFG, "rope_parameters": "default"}, "rope_parameters"),
    "rope_scaling number": ({**LEGACY, "rope_scaling": 4.0}, "rope_scaling"),
    "rope_scaling list next to rope_parameters": ({**GOLDEN_CFG, "rope_scaling": ["linear"]}, "rope_scaling"),
    "rope type a list": ({**GOLDEN_CFG, "rope_parameters": {"rope_type": ["linear"]}}, "rope_type"),
    "partial rotary string": ({**GOLDEN_CFG, "partial_rotary_factor": "1"}, "partial_rotary_factor"),
    "window zero": (mistral(sliding_window=0), "sliding_window"),
    "window negative": (mistral(sliding_window=-4096), "sliding_window"),
    "window string": (qwen2(use_sliding_window=True, sliding_window="64"), "sliding_window"),
    "tie string": ({**GOLDEN_CFG, "tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    "tie int": ({**GOLDEN_CFG, "tie_word_embeddings": 1}, "tie_word_embeddings"),
    "attention_bias string": ({**GOLDEN_CFG, "attention_bias": "false"}, "attention_bias"),
    "mlp_bias string": ({**GOLDEN_CFG, "mlp_bias": "no"}, "mlp_bias"),
    "use_sliding_window string": (qwen2(use_sliding_window="true", sliding_window=64), "use_sliding_window"),
    "max_window_layers float": (qwen2(use_sliding_window=True, sliding_window=64, max_window_layers=1.5),
                                "max_window_layers"),
    "layer_types too short": (qwen2(layer_types=["full_attention"] * 3), "layer_types"),
    "layer_types too long": (qwen2(layer_types=["full_attention"] * 6), "layer_types"),
    "layer_types a string": (qwen2(layer_types="full_attention"), "layer_types"),
    "layer_types of ints": (qwen2(layer_types=[0, 0, 0, 0, 0]), "layer_types"),
    "layer_types huge": (qwen2(layer_types=["full_attention"] * 10**6), "layer_types"),
    "model_type a list": ({**GOLDEN_CFG, "model_type": ["llama"]}, "model_type"),
    "hidden_act an object": ({**GOLDEN_CFG, "hidden_act": {"name": "silu"}}, "hidden_act"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_parse_arch_rejects_nonsense_naming_the_field(name):
    cfg, field = BAD_CONFIGS[name]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(LlmcError) as e:
            parse_arch(cfg)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert "config.json" in message and field in message, message
    assert len(message.splitlines()) == 1 and len(message) < 400, message
    assert seconds < 0.5 and peak < 5 << 20, (seconds, peak)       # checked before anything is built


def test_unsupported_features_are_unsupported_errors():
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        parse_arch(qwen2(layer_types=["full_attention", "chunked_attention"] * 2 + ["full_attention"]))
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        parse_arch({**GOLDEN_CFG, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def hf_config(model_type: str, **overrides) -> dict:
    """config.json as transformers' save_pretrained writes it (nulls for unset fields included)."""
    from tests.helpers import BASE, hf_classes
    return json.loads(hf_classes(model_type)[0](**{**BASE, **overrides}).to_json_string())


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}), ("mistral", {}), ("mistral", {"sliding_window": None}), ("qwen2", {}), ("qwen3", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
])
def test_configs_written_by_transformers_still_parse(model_type, overrides):
    cfg = hf_config(model_type, **overrides)
    arch = parse_arch(cfg)
    assert arch.num_layers == cfg["num_hidden_layers"] and len(arch.sliding_windows) == arch.num_layers
    assert ArchConfig.from_dict(arch.to_dict()) == arch


def test_null_means_absent_where_transformers_writes_it():
    cfg = {**LEGACY, "rope_scaling": None, "head_dim": None, "sliding_window": None, "num_key_value_heads": None,
           "attention_bias": None, "rope_parameters": None}
    arch = parse_arch(cfg)
    assert (arch.head_dim, arch.num_kv_heads, arch.rope.rope_type) == (8, 8, "default")
    assert parse_arch(mistral(sliding_window=None)).sliding_windows == (None,) * 5
    assert parse_arch(qwen2(sliding_window=None, use_sliding_window=False)).sliding_windows == (None,) * 5


def test_bounds_are_generous_for_real_models():
    big = {**GOLDEN_CFG, "num_hidden_layers": 126, "hidden_size": 16384, "intermediate_size": 53248,
           "num_attention_heads": 128, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 256000,
           "max_position_embeddings": 10_485_760, "rope_parameters": {"rope_type": "default", "rope_theta": 5e8}}
    assert parse_arch(big).num_params > 400e9
    assert parse_arch({**GOLDEN_CFG, "num_hidden_layers": MAX_LAYERS}).num_layers == MAX_LAYERS


# ---- engine manifests: ArchConfig.from_dict validates exactly as parse_arch does -------------------
ARCH_DICT = parse_arch(GOLDEN_CFG).to_dict()

BAD_MANIFESTS = {   # name: (architecture dict, field the message must name)
    "not an object": ([ARCH_DICT], "architecture"),
    "null": (None, "architecture"),
    "missing field": ({k: v for k, v in ARCH_DICT.items() if k != "head_dim"}, "head_dim"),
    "missing windows": ({k: v for k, v in ARCH_DICT.items() if k != "sliding_windows"}, "sliding_windows"),
    "unknown field": ({**ARCH_DICT, "num_experts": 8}, "num_experts"),
    "layers float": ({**ARCH_DICT, "num_layers": 2.5}, "num_layers"),
    "layers huge": ({**ARCH_DICT, "num_layers": 10**7}, "num_layers"),
    "heads string": ({**ARCH_DICT, "num_heads": "8"}, "num_heads"),
    "kv heads not dividing": ({**ARCH_DICT, "num_kv_heads": 3}, "num_kv_heads"),
    "eps nan": ({**ARCH_DICT, "rms_norm_eps": math.nan}, "rms_norm_eps"),
    "tie string": ({**ARCH_DICT, "tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    "rope a list": ({**ARCH_DICT, "rope": [10000.0]}, "rope"),
    "rope unknown key": ({**ARCH_DICT, "rope": {**ARCH_DICT["rope"], "beta_fast": 32}}, "beta_fast"),
    "rope theta negative": ({**ARCH_DICT, "rope": {**ARCH_DICT["rope"], "theta": -1.0}}, "theta"),
    "rope type unknown": ({**ARCH_DICT, "rope": {**ARCH_DICT["rope"], "rope_type": "yarn"}}, "rope_type"),
    "windows a number": ({**ARCH_DICT, "sliding_windows": 5}, "sliding_windows"),
    "windows wrong length": ({**ARCH_DICT, "sliding_windows": [None, None]}, "sliding_windows"),
    "window zero": ({**ARCH_DICT, "sliding_windows": [None, None, 0, None, None]}, "sliding_windows"),
    "model type unknown": ({**ARCH_DICT, "model_type": "gpt2"}, "model_type"),
    "model type a list": ({**ARCH_DICT, "model_type": ["llama"]}, "model_type"),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_from_dict_rejects_malformed_manifests(name):
    d, field = BAD_MANIFESTS[name]
    with pytest.raises(LlmcError) as e:
        ArchConfig.from_dict(d)
    message = str(e.value)
    assert field in message and len(message.splitlines()) == 1, message


def test_both_paths_share_one_validation():
    """The same value is refused by both, with the same words (only the field's name differs)."""
    with pytest.raises(ModelFormatError) as from_config:
        parse_arch({**GOLDEN_CFG, "num_hidden_layers": MAX_LAYERS + 1})
    with pytest.raises(ModelFormatError) as from_manifest:
        ArchConfig.from_dict({**ARCH_DICT, "num_layers": MAX_LAYERS + 1})
    assert str(from_config.value).split("num_hidden_layers")[1] == str(from_manifest.value).split("num_layers")[1]


# ---- tokenizer ids ---------------------------------------------------------------------------------
def model_copy(tmp_path: Path, source: Path = STORIES, **edits: dict) -> Path:
    """A copy of `source` with top-level keys of its JSON files replaced (None deletes a key)."""
    d = tmp_path / "model"
    shutil.copytree(source, d)
    for fname, patch in edits.items():
        path = d / f"{fname}.json"
        data = json.loads(path.read_text())
        data.update(patch)
        path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return d


@pytest.mark.parametrize("edits,file,field", [
    (dict(generation_config={"eos_token_id": "abc"}), "generation_config.json", "eos_token_id"),
    (dict(generation_config={"eos_token_id": None}, config={"eos_token_id": "abc"}), "config.json", "eos_token_id"),
    (dict(generation_config={"eos_token_id": [2, "</s>"]}), "generation_config.json", "eos_token_id[1]"),
    (dict(generation_config={"eos_token_id": -1}), "generation_config.json", "eos_token_id"),
    (dict(generation_config={"eos_token_id": 2.0}), "generation_config.json", "eos_token_id"),
    (dict(generation_config={"eos_token_id": True}), "generation_config.json", "eos_token_id"),
    (dict(generation_config={"eos_token_id": 512}), "generation_config.json", "eos_token_id"),   # vocab is 512
    (dict(generation_config={"eos_token_id": {"id": 2}}), "generation_config.json", "eos_token_id"),
    (dict(generation_config={"bos_token_id": "1"}), "generation_config.json", "bos_token_id"),
    (dict(generation_config={"bos_token_id": [1]}), "generation_config.json", "bos_token_id"),
    (dict(config={"bos_token_id": -1}), "config.json", "bos_token_id"),
    (dict(tokenizer_config={"add_bos_token": "yes"}), "tokenizer_config.json", "add_bos_token"),
    (dict(tokenizer_config={"eos_token": 2}), "tokenizer_config.json", "eos_token"),
    (dict(tokenizer_config={"bos_token": {"content": 1}}), "tokenizer_config.json", "bos_token"),
    (dict(tokenizer_config={"bos_token": "\ud800"}), "tokenizer_config.json", "bos_token"),   # lone surrogate
])
def test_bad_token_ids_name_the_file_and_field(tmp_path, edits, file, field):
    d = model_copy(tmp_path, **edits)
    with pytest.raises(ModelFormatError) as e:
        Tokenizer(d)
    message = str(e.value)
    assert f"{file}: {field}" in message and len(message.splitlines()) == 1, message


def test_good_token_ids_still_read(tmp_path):
    d = model_copy(tmp_path, generation_config={"eos_token_id": [2, 1], "bos_token_id": None},
                   tokenizer_config={"add_bos_token": None, "bos_token": {"content": "<s>", "lstrip": False}})
    info = Tokenizer(d).info
    assert info.eos_token_ids == (2, 1) and info.bos_token_id == 1 and info.add_bos is None


def test_malformed_quantization_recipe_is_a_user_error():
    with pytest.raises(ModelFormatError, match="quantization recipe"):
        _describe({"recipe": {"scheme": "w8a16"}}, Path("m/config.json"))


# ---- end to end: `llmc inspect` on a copy of the golden model with one bad field -------------------
@pytest.mark.parametrize("edits,file,field", [
    (dict(config={"num_hidden_layers": 10_000_000}), "config.json", "num_hidden_layers"),
    (dict(config={"tie_word_embeddings": "yes"}), "config.json", "tie_word_embeddings"),
    (dict(config={"rope_parameters": [10000.0]}), "config.json", "rope_parameters"),
    (dict(generation_config={"eos_token_id": "abc"}), "generation_config.json", "eos_token_id"),
])
def test_inspect_reports_one_line_and_exits_2(tmp_path, edits, file, field):
    d = model_copy(tmp_path, **edits)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "llmc", "inspect", str(d)], capture_output=True, text=True,
                       timeout=120)
    assert time.perf_counter() - start < 60          # was minutes and 4.7 GB for 10M layers
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert file in lines[0] and field in lines[0] and "Traceback" not in r.stderr, lines[0]
    assert r.stdout == ""


def test_golden_checkpoints_parse():
    for name in ("stories260K", "stdlib-llama"):
        cfg = json.loads((GOLDEN / name / "config.json").read_text())
        assert ArchConfig.from_dict(parse_arch(cfg).to_dict()) == parse_arch(cfg)
