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


def test_generate_stop_strings_penalties_logprobs_and_prompt_sources(capsys, tmp_path, monkeypatch):
    import io
    base = ["generate", str(STORIES), "--max-tokens", "20", "--json"]
    full = json.loads(run(capsys, *base, "-p", "Once upon a time").out)[0]
    stop = full["text"][8:12]
    cut = json.loads(run(capsys, *base, "-p", "Once upon a time", "--stop", stop, "--logprobs", "2").out)[0]
    assert cut["text"] == full["text"][:full["text"].index(stop)] and cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == stop and len(cut["logprobs"]) == len(cut["token_ids"])
    assert all(len(t["top"]) == 2 and t["logprob"] <= 0 for t in cut["logprobs"])
    penal = json.loads(run(capsys, *base, "-p", "Once upon a time", "--repetition-penalty", "3",
                           "--frequency-penalty", "1", "--presence-penalty", "0.5").out)[0]
    assert penal["token_ids"] != full["token_ids"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nTom\n", encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO("She"))
    out = json.loads(run(capsys, *base, "--prompt-file", str(prompts), "-p", "-").out)
    assert [o["prompt"] for o in out] == ["She", "Once upon a time", "Tom"]
    assert out[1]["token_ids"] == full["token_ids"]
