"""Every user error: one line on stderr, exit code 2, no traceback (unless --debug)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import STORIES


def llmc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    cases = {}
    (root / "empty").mkdir()
    cases["not_a_model"] = root / "empty"
    arch = root / "gpt2"
    shutil.copytree(STORIES, arch)
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    cases["unsupported"] = arch
    for name, cut in (("truncated", lambda b: b[: len(b) // 2]), ("corrupt", lambda b: b"\xff" * 8 + b[8:])):
        d = root / name
        shutil.copytree(STORIES, d)
        (d / "model.safetensors").write_bytes(cut((d / "model.safetensors").read_bytes()))
        cases[name] = d
    engine = root / "altered.engine"
    assert llmc("compile", str(STORIES), "-o", str(engine)).returncode == 0
    data = bytearray((engine / "weights.safetensors").read_bytes())
    data[-5] ^= 1
    (engine / "weights.safetensors").write_bytes(bytes(data))
    cases["altered_engine"] = engine
    quantized = root / "q8"
    assert llmc("quantize", str(STORIES), "-o", str(quantized), "--scheme", "w8a16").returncode == 0
    cases["quantized"] = quantized
    (root / "empty.txt").write_text("")
    cases["empty_calib"] = root / "empty.txt"
    cases["root"] = root
    return cases


CASES = {
    "missing path": (lambda c: ["inspect", str(c["root"] / "nope")], "no such file or directory"),
    "file not dir": (lambda c: ["generate", str(STORIES / "config.json"), "-p", "x"], "is a file"),
    "not a model": (lambda c: ["inspect", str(c["not_a_model"])], "not a model directory"),
    "unsupported arch": (lambda c: ["compile", str(c["unsupported"]), "-o", str(c["root"] / "o1")],
                         "model_type 'gpt2' is not supported"),
    "truncated safetensors": (lambda c: ["generate", str(c["truncated"]), "-p", "x"], "truncated safetensors"),
    "corrupt safetensors": (lambda c: ["inspect", str(c["corrupt"])], "not a safetensors file"),
    "altered engine": (lambda c: ["generate", str(c["altered_engine"]), "-p", "x"], "weights.safetensors: altered"),
    "bad option value": (lambda c: ["generate", str(STORIES), "-p", "x", "--max-tokens", "many"], "--max-tokens"),
    "bad sampling value": (lambda c: ["generate", str(STORIES), "-p", "x", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    "unknown kernels": (lambda c: ["generate", str(STORIES), "-p", "x", "--kernels", "gpu"], "kernel set"),
    "no prompt": (lambda c: ["generate", str(STORIES)], "give a prompt"),
    "too many stop strings": (lambda c: ["generate", str(STORIES), "-p", "x", *["--stop", "a"] * 5], "--stop"),
    "bad penalty": (lambda c: ["generate", str(STORIES), "-p", "x", "--presence-penalty", "3"],
                    "--presence-penalty: must be in [-2, 2]"),
    "prompt file missing": (lambda c: ["generate", str(STORIES), "--prompt-file", str(c["root"] / "nope.txt")],
                            "--prompt-file"),
    "serve: bad port": (lambda c: ["serve", str(STORIES), "--port", "70000"], "--port: must be in [0, 65535]"),
    "serve: bad queue": (lambda c: ["serve", str(STORIES), "--max-queue", "0"], "--max-queue: must be at least 1"),
    "serve: missing model": (lambda c: ["serve", str(c["root"] / "nope")], "no such file or directory"),
    "serve: an address not on this machine": (lambda c: ["serve", str(STORIES), "--host", "203.0.113.7", "--port", "0"],
                           "cannot listen on 203.0.113.7"),
    "unknown target": (lambda c: ["compile", str(STORIES), "-o", str(c["root"] / "o2"), "--target", "tpu"],
                       "unknown target"),
    "unknown pass": (lambda c: ["compile", str(STORIES), "-o", str(c["root"] / "o3"), "--passes", "nope"],
                     "unknown pass"),
    "unknown option": (lambda c: ["inspect", str(STORIES), "--frob"], "--frob"),
    "unknown scheme": (lambda c: ["quantize", str(STORIES), "-o", str(c["root"] / "o4"), "--scheme", "w3a16"],
                       "unknown scheme"),
    "scheme/algo combination": (lambda c: ["quantize", str(STORIES), "-o", str(c["root"] / "o5"), "--scheme",
                                           "w4a16", "--algo", "smoothquant"], "does not produce scheme"),
    "group size on a per-channel scheme": (lambda c: ["quantize", str(STORIES), "-o", str(c["root"] / "o6"),
                                                      "--scheme", "w8a16", "--group-size", "64"], "group-wise"),
    "calibration file missing": (lambda c: ["quantize", str(STORIES), "-o", str(c["root"] / "o8"), "--scheme",
                                            "w4a16", "--algo", "gptq", "--calib", str(c["root"] / "nope.txt")],
                                 "calibration file not found"),
    "calibration file empty": (lambda c: ["quantize", str(STORIES), "-o", str(c["root"] / "o9"), "--scheme",
                                          "w4a16", "--algo", "awq", "--calib", str(c["empty_calib"])], "is empty"),
    "already quantized": (lambda c: ["quantize", str(c["quantized"]), "-o", str(c["root"] / "o7"), "--scheme",
                                     "w4a16"], "already quantized"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_line_exit_2(broken, name):
    args, needle = CASES[name]
    r = llmc(*args(broken))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_debug_shows_the_traceback(broken):
    r = llmc("--debug", "inspect", str(broken["not_a_model"]))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_no_output_dir_is_left_after_a_failed_command(broken):
    assert not [p for p in broken["root"].iterdir() if p.name.startswith(("o", "."))]
