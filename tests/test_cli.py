"""The CLI's happy paths: JSON outputs, --dump-ir, --passes, several prompts."""
from __future__ import annotations

import json

from llmc.cli import main
from tests.helpers import STORIES


def run(capsys, *args: str):
    main(list(args))
    return capsys.readouterr()


def test_inspect_json(capsys):
    r = json.loads(run(capsys, "inspect", str(STORIES), "--json").out)
    assert (r["architecture"], r["layers"], r["heads"], r["kv_heads"], r["head_dim"], r["vocab_size"]) == \
        ("llama", 5, 8, 4, 8, 512)
    assert r["parameters"] == 260_032 and r["kv_cache_bytes_per_token"] == 1280 and r["dtype"] == "F32"
    assert r["bytes_on_disk"] > 1_000_000


def test_compile_json_dump_ir_and_generate(capsys, tmp_path):
    engine, dump = tmp_path / "e", tmp_path / "ir"
    r = json.loads(run(capsys, "compile", str(STORIES), "-o", str(engine), "--dump-ir", str(dump), "--json").out)
    assert r["target"] == "cpu" and r["nodes"] == 43 and r["bytes"] > 1_000_000
    assert sorted(p.name for p in dump.iterdir()) == [".llmc-output.json", "00-input.txt", "01-fuse-qkv.txt", "02-fuse-gate-up-silu.txt",
                                                     "03-fuse-add-rms-norm.txt", "04-dce.txt", "final.txt"]
    out = json.loads(run(capsys, "generate", str(engine), "-p", "Once upon a time", "-p", "Tom",
                         "--max-tokens", "5", "--json").out)
    assert [o["prompt"] for o in out] == ["Once upon a time", "Tom"]
    assert all(len(o["token_ids"]) == 5 and o["finish_reason"] == "length" for o in out)
    assert out[0]["text"] == ", there was a little"


def test_compile_without_passes(capsys, tmp_path):
    r = json.loads(run(capsys, "compile", str(STORIES), "-o", str(tmp_path / "e"), "--passes", "", "--json").out)
    assert r["passes"] == [] and r["nodes"] == 73
    text = run(capsys, "generate", str(tmp_path / "e"), "-p", "Once upon a time", "--max-tokens", "5").out
    assert text.startswith("Once upon a time, there was a little")
