"""The engine format: manifest contents, atomic writes, and refusal of damaged engines."""
from __future__ import annotations

import json
import shutil

import pytest

from llmc.compiler import compile
from llmc.engine import ENGINE_FILE, SCHEMA_VERSION, WEIGHTS_FILE
from llmc.errors import ConfigError, EngineError
from llmc.inspection import inspect
from llmc.loader import load_model
from tests.helpers import STORIES


@pytest.fixture(scope="module")
def engine(stories_engine):
    return stories_engine


def copy(engine, tmp_path):
    dst = tmp_path / "copy.engine"
    shutil.copytree(engine, dst)
    return dst


def test_manifest(engine):
    m = json.loads((engine / ENGINE_FILE).read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["target"] == "cpu" and m["dtype"] == "float32"
    assert m["architecture"]["model_type"] == "llama" and m["architecture"]["num_kv_heads"] == 4
    assert [p["name"] for p in m["passes"]] == ["fuse-qkv", "fuse-gate-up-silu", "fuse-add-rms-norm", "dce"]
    assert set(m["files"]) >= {WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]   # no temp dirs left behind


def test_inspect_engine_and_checkpoint_agree(engine):
    a, b = inspect(engine), inspect(STORIES)
    assert (a.kind, b.kind) == ("engine", "hf")
    assert a.parameters == b.parameters == 260_032
    assert a.kv_cache_bytes_per_token == b.kv_cache_bytes_per_token == 2 * 5 * 4 * 8 * 4


@pytest.mark.parametrize("damage,message", [
    (lambda e: (e / WEIGHTS_FILE).unlink(), "weights.safetensors: missing"),
    (lambda e: (e / WEIGHTS_FILE).write_bytes((e / WEIGHTS_FILE).read_bytes()[:-100]), "weights.safetensors: truncated"),
    (lambda e: (e / "tokenizer.json").write_text((e / "tokenizer.json").read_text().replace("Lily", "Lilx")),
     "tokenizer.json: altered"),
    (lambda e: (e / ENGINE_FILE).write_text("{not json"), "not valid JSON"),
    (lambda e: (e / ENGINE_FILE).write_text(json.dumps({**json.loads((e / ENGINE_FILE).read_text()),
                                                        "schema_version": 99})), "schema version 99"),
])
def test_damaged_engine_is_refused_naming_the_file(engine, tmp_path, damage, message):
    e = copy(engine, tmp_path)
    damage(e)
    with pytest.raises(EngineError, match=message):
        load_model(e)


def test_flipped_weight_byte_is_caught(engine, tmp_path):
    e = copy(engine, tmp_path)
    data = bytearray((e / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (e / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(EngineError, match="weights.safetensors: altered"):
        load_model(e)


def test_compile_refuses_to_overwrite_and_failed_compile_leaves_nothing(engine, tmp_path):
    with pytest.raises(ConfigError, match="already exists"):
        compile(STORIES, engine)
    bad = tmp_path / "bad"
    shutil.copytree(STORIES, bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(Exception):
        compile(bad, tmp_path / "out.engine")
    assert not (tmp_path / "out.engine").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
