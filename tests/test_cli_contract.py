"""The public API as a user imports it, and the CLI's small contracts: --version, --json -,
`llmc bench` alone, and options validated before any work, named as typed."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.helpers import GOLDEN, STORIES


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def llmc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def one_error(r: subprocess.CompletedProcess, needle: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    return lines[0]


# ---- the public API ---------------------------------------------------------------------------

def test_the_documented_api_works_as_imported():
    r = python(f"""
import llmc
from llmc import generate, SamplingParams
assert callable(llmc.generate) and llmc.generate is generate
out = llmc.generate({str(STORIES)!r}, ["Once"], SamplingParams(max_tokens=3))
assert len(out.completions) == 1 and len(out.completions[0].token_ids) == 3
one = llmc.generate({str(STORIES)!r}, "Once upon", llmc.SamplingParams(max_tokens=2))
assert len(one.completions) == 1, "a string is one prompt, not one per character"
ids = llmc.generate({str(STORIES)!r}, [1, 403], llmc.SamplingParams(max_tokens=2))
assert len(ids.completions) == 1 and ids.completions[0].prompt_tokens == 2
import llmc.generation                       # importing the module does not shadow the function
assert callable(llmc.generate)
from llmc import compile, inspect, quantize, load_model, RuntimeConfig, QuantRecipe
assert inspect({str(STORIES)!r}).layers == 5
print("ok")
""")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_bad_prompts_are_user_errors():
    from llmc.errors import ConfigError
    from llmc.generation import check_prompts
    for bad in ([], None, [["a"]], [1.5], {"p": 1}):
        with pytest.raises(ConfigError):
            check_prompts(bad)
    assert check_prompts("x") == ["x"] and check_prompts([3, 4]) == [[3, 4]]


# ---- small CLI contracts ----------------------------------------------------------------------

def test_version():
    from llmc import __version__
    r = llmc("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmc {__version__}"


def test_gate_with_missing_files_is_one_line():
    one_error(llmc("gate", "r.json", "--baseline", "b.json"), "r.json: no such result file")


def test_bench_alone_prints_its_help():
    r = llmc("bench")
    assert r.returncode == 0 and "quality" in r.stdout and r.stderr == ""


# ---- options: validated before any work, named as typed, with their origin ----------------------

def test_calib_seqlen_beyond_the_context_is_refused_at_once(tmp_path):
    t0 = time.perf_counter()
    one_error(llmc("quantize", STORIES, "-o", tmp_path / "q", "--scheme", "w4a16", "--algo", "gptq",
                   "--calib-seqlen", "100000"), "--calib-seqlen: 100000 tokens is longer than the model's context (512")
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "q").exists()


def test_default_calib_seqlen_is_capped_by_a_short_context(tmp_path):
    model = tmp_path / "short"
    import shutil
    shutil.copytree(STORIES, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 256}))
    r = llmc("quantize", model, "-o", tmp_path / "q", "--scheme", "w4a16", "--algo", "gptq", "--group-size", "32",
             "--calib-samples", "4")
    assert r.returncode == 0, r.stderr
    assert "capped at the model's context, 256" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--group-size", "1000000000000"], "--group-size: must be in [1, 65536]"),
    (["--group-size", "4096"], "--group-size: 4096 is wider than every linear input"),
    (["--algo", "rtn", "--alpha", "0.3"], "--alpha: has no effect on w4a16 with rtn"),
    (["--algo", "rtn", "--calib", str(GOLDEN / "stdlib-llama" / "calibration.txt")], "--calib: has no effect"),
    (["--algo", "awq", "--observer", "mse"], "--observer: algorithm 'awq' chooses its own weight ranges"),
    (["--calib-samples", "0", "--algo", "gptq"], "--calib-samples: must be at least 1"),
    (["--act-observer", "nope"], "--act-observer: unknown observer 'nope'"),
    (["--format", "onnx"], "--format: unknown format 'onnx'"),
])
def test_quantize_option_errors_name_the_flag(tmp_path, args, needle):
    one_error(llmc("quantize", STORIES, "-o", tmp_path / "q", "--scheme", "w4a16", *args), needle)
    assert not (tmp_path / "q").exists()


def test_an_option_from_a_profile_is_reported_as_such(tmp_path):
    profile = tmp_path / "mine.toml"
    profile.write_text('[quantize]\nscheme = "w4a16"\ngroup_size = 0\n')
    one_error(llmc("quantize", STORIES, "-o", tmp_path / "q", "--profile", profile),
              f"--group-size (from profile {profile}): must be in [1, 65536], got 0")
    r = llmc("quantize", STORIES, "-o", tmp_path / "q", "--profile", "int4-gptq", "--algo", "rtn")
    assert r.returncode == 0 and "--calib-samples from profile int4-gptq has no effect" in r.stderr


def test_gptq_format_refuses_a_model_it_cannot_hold_before_quantizing(tmp_path):
    t0 = time.perf_counter()
    line = one_error(llmc("quantize", STORIES, "-o", tmp_path / "q", "--scheme", "w4a16", "--algo", "gptq",
                          "--group-size", "32", "--format", "gptq", "--calib-samples", "128"),
                     "cannot express in the GPTQ layout")
    assert "quantizing" not in line and len(line) < 500 and "mlp.down_proj of layers 0-4" in line
    assert time.perf_counter() - t0 < 30 and list(tmp_path.iterdir()) == []


def test_generate_errors_name_the_flags():
    one_error(llmc("generate", STORIES, "-p", "x", "--top-k", "0"), "--top-k: must be at least 1")
    one_error(llmc("generate", STORIES, "-p", "x", "--max-tokens", "0"), "--max-tokens: must be at least 1")
    one_error(llmc("generate", STORIES, "-p", "x", "--max-num-seqs", "0"), "--max-num-seqs: must be at least 1")


def test_calibration_tokens_beyond_the_vocabulary_are_a_user_error(tmp_path):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(STORIES, model)
    shutil.copy(GOLDEN / "stdlib-llama" / "tokenizer.json", model / "tokenizer.json")   # 4096 ids, vocab 512
    one_error(llmc("quantize", model, "-o", tmp_path / "q", "--scheme", "w4a16", "--algo", "gptq", "--group-size",
                   "32", "--calib-samples", "4"), "outside the model's vocabulary (vocab_size 512")


def test_quantize_refuses_a_fifo_tokenizer_and_a_malformed_quantization_config(tmp_path):
    import os
    import shutil
    fifo = tmp_path / "fifo"
    shutil.copytree(STORIES, fifo)
    (fifo / "tokenizer.json").unlink()
    os.mkfifo(fifo / "tokenizer.json")
    one_error(llmc("quantize", fifo, "-o", tmp_path / "q", "--scheme", "w4a16", "--algo", "gptq"), "not a regular file")
    bad = tmp_path / "bad"
    shutil.copytree(STORIES, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": ["gptq"]}))
    one_error(llmc("quantize", bad, "-o", tmp_path / "q", "--scheme", "w8a16"), "quantization_config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "fifo"]
