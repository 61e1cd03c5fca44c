"""Profiles: bundled recipes are valid, the command line wins over the profile, bad profiles fail
with one line naming the file and the key."""
from __future__ import annotations

import json

import pytest

from llmc.cli import main
from llmc.errors import ConfigError
from llmc.passes.quant.algorithms import check_recipe
from llmc.quantized.scheme import recipe_from_options
from llmc.profiles import available_profiles, load_profile, resolve_options
from tests.helpers import STORIES


def test_bundled_profiles_make_valid_recipes():
    names = available_profiles()
    assert {"int8", "int4-gptq", "int4-awq", "int8-smoothquant", "fp8", "int4-gptq-kv8"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.description, name
        q = p.section("quantize")
        check_recipe(recipe_from_options(**q))
        assert p.section("compile").get("target", "cpu") == "cpu"


def test_precedence_command_line_then_profile_then_default():
    o = resolve_options("quantize", {"scheme": None, "group_size": 64, "algo": None, "alpha": None},
                        {"algo": "rtn", "alpha": 0.5}, "int4-gptq")
    assert o == {"scheme": "w4a16", "group_size": 64, "algo": "gptq", "alpha": 0.5}
    assert resolve_options("quantize", {"algo": None}, {"algo": "rtn"}, None) == {"algo": "rtn"}


@pytest.mark.parametrize("text,message", [
    ("[quantize]\nschema = 'w8a16'\n", "[quantize] has no option 'schema'"),
    ("[quantize]\ngroup_size = '128'\n", "[quantize] group_size must be int"),
    ("[quantize]\nasymmetric = 1\n", "[quantize] asymmetric must be bool"),
    ("[serve]\nport = 1\n", "unknown table [serve]"),
    ("[compile]\npasses = ['dce', 3]\n", "[compile] passes must be a list of strings"),
    ("[quantize\n", "not valid TOML"),
])
def test_bad_profiles(tmp_path, text, message):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_profile(str(f))
    assert message in str(e.value) and str(f) in str(e.value)


def test_relative_calibration_path_is_relative_to_the_profile(tmp_path):
    (tmp_path / "calib.txt").write_text("once upon a time " * 50)
    (tmp_path / "p.toml").write_text("[quantize]\nscheme = 'w8a16'\ncalib = 'calib.txt'\n")
    assert load_profile(str(tmp_path / "p.toml")).section("quantize")["calib"] == str(tmp_path / "calib.txt")


def test_cli_quantize_and_compile_with_a_profile(tmp_path, capsys):
    prof = tmp_path / "mine.toml"
    prof.write_text("description = 'test'\n[quantize]\nscheme = 'w4a16'\nalgo = 'awq'\ngroup_size = 32\n"
                    "calib_samples = 4\ncalib_seqlen = 64\n[compile]\npasses = ['fuse-qkv', 'dce']\n")
    out = tmp_path / "q"
    main(["quantize", str(STORIES), "-o", str(out), "--profile", str(prof), "--algo", "rtn", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["profile"] == str(prof) and r["recipe"]["algorithm"] == "rtn"          # the command line wins
    assert r["recipe"]["scheme"]["weight"]["group_size"] == 32 and r["recipe"]["calib_samples"] == 4
    main(["compile", str(out), "-o", str(tmp_path / "e"), "--profile", str(prof), "--json"])
    c = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in c["passes"]] == ["fuse-qkv", "dce"]


def test_cli_profile_errors(tmp_path, capsys):
    for args, message in ((["--profile", "nope"], "unknown profile 'nope'; bundled: "),
                          ([], "missing --scheme")):
        with pytest.raises(SystemExit) as e:
            main(["quantize", str(STORIES), "-o", str(tmp_path / "x"), *args])
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "x").exists()


def test_a_runtime_table_sets_llmc_serve_s_options(tmp_path):
    """`llmc serve --profile` takes its runtime options from [runtime]; the command line still wins."""
    import re
    import signal
    import subprocess
    import sys

    p = tmp_path / "serve.toml"
    p.write_text("[runtime]\nmax_num_seqs = 3\nprefix_cache = false\nkv_blocks = 40\nmax_batched_tokens = 64\n")
    proc = subprocess.Popen([sys.executable, "-m", "llmc", "serve", str(STORIES), "--port", "0", "--profile", str(p),
                             "--kv-blocks", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = []
        for line in proc.stdout:
            head.append(line)
            if line.startswith("listening on"):
                break
        text = "".join(head)
        assert "up to 3 sequences per step, prefix caching off" in text, text
        assert re.search(r"KV cache 480 tokens", text), text             # 30 blocks of 16, from the command line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime]\nmax_num_seqs = 'many'\n")
    r = subprocess.run([sys.executable, "-m", "llmc", "serve", str(STORIES), "--profile", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "[runtime] max_num_seqs must be int" in r.stderr
