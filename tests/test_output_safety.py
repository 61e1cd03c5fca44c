"""Outputs never destroy data: an output may not equal, contain or lie inside an input; --force
replaces only what llmc wrote; replacing is atomic; leftovers of dead runs are cleaned up."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmc import io as llmc_io
from llmc.io import MARKER, OutputError, atomic_directory, check_output, clean_leftovers
from tests.helpers import GOLDEN, STORIES

TEXT = GOLDEN / "tinystories_valid_head.txt"


def llmc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


@pytest.fixture
def model(tmp_path) -> Path:
    m = tmp_path / "data" / "model"
    shutil.copytree(STORIES, m)
    (tmp_path / "data" / "sentinel.txt").write_text("keep me")
    return m


def test_compile_into_a_directory_containing_the_model_is_refused(model, tmp_path):
    data = model.parent
    before = digest(data)
    refused(llmc("compile", model, "-o", data, "--force"), "contains the input")
    assert digest(data) == before                                      # the sentinel and the model survive


def test_quantize_onto_its_own_input_is_refused(tmp_path, model):
    q = tmp_path / "q"
    assert llmc("quantize", model, "-o", q, "--scheme", "w8a16").returncode == 0
    before = digest(q)
    refused(llmc("quantize", q, "-o", q, "--scheme", "w8a16", "--force", "--requantize"), "is the input")
    refused(llmc("compile", model, "-o", model / "engine", "--force"), "lies inside the input")
    assert digest(q) == before


def test_force_never_replaces_foreign_data(tmp_path, model):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    refused(llmc("compile", model, "-o", foreign, "--force"), "was not written by llmc")
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    refused(llmc("compile", model, "-o", plain, "--force"), "not an output directory llmc wrote")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(llmc("compile", model, "-o", fifo, "--force"), "is a FIFO")
    assert (foreign / "thesis.tex").read_text() == "years of work" and plain.read_text() == "mine"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_force_refuses_an_llmc_output_that_gained_foreign_files(tmp_path, model):
    engine = tmp_path / "e"
    assert llmc("compile", model, "-o", engine).returncode == 0
    assert llmc("compile", model, "-o", engine, "--force").returncode == 0       # ours: replaced
    (engine / "my-notes.md").write_text("notes")
    refused(llmc("compile", model, "-o", engine, "--force"), "holds files llmc did not write (my-notes.md)")
    assert (engine / "my-notes.md").read_text() == "notes"


def test_bench_json_never_replaces_devices_fifos_or_foreign_files(tmp_path, model):
    args = ["bench", "quality", model, "--reference", model, "--text", TEXT, "--max-tokens", "200", "--json"]
    refused(llmc(*args, "/dev/null"), "is a character device")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(llmc(*args, fifo, timeout=60), "is a FIFO")                # and it does not hang on the FIFO
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "data"}')
    refused(llmc(*args, mine), "was not written by llmc")
    assert mine.read_text() == '{"my": "data"}'
    result = tmp_path / "r.json"
    assert llmc(*args, result).returncode == 0
    assert llmc(*args, result).returncode == 0                        # llmc's own result: replaced
    refused(llmc(*args, model / "r.json"), "lies inside the input")
    stdout = llmc(*args, "-")
    assert stdout.returncode == 0 and '"perplexity"' in stdout.stdout and not (Path.cwd() / "-").exists()


def test_dump_ir_onto_an_existing_file_is_a_user_error(tmp_path, model):
    f = tmp_path / "ir.txt"
    f.write_text("x")
    refused(llmc("compile", model, "-o", tmp_path / "e", "--dump-ir", f), "ir.txt")
    assert f.read_text() == "x" and not (tmp_path / "e").exists()


def test_outputs_have_uniform_modes_and_a_marker(tmp_path, model):
    q = tmp_path / "q"
    assert llmc("quantize", model, "-o", q, "--scheme", "w8a16").returncode == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in q.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes               # *.safetensors were 0600
    assert MARKER in modes


# ---- atomic replacement -------------------------------------------------------------------------

def _write(final: Path, text: str, **kw) -> None:
    with atomic_directory(final, **kw) as tmp:
        (tmp / "f.txt").write_text(text)


def test_replace_by_exchange_leaves_no_leftovers(tmp_path):
    final = tmp_path / "out"
    _write(final, "old")
    _write(final, "new", overwrite=True)
    assert (final / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failure_at_the_swap_leaves_the_old_output(tmp_path, monkeypatch, exchange):
    final = tmp_path / "out"
    _write(final, "old")

    def boom(*a):
        raise RuntimeError("killed between the two steps")
    if exchange:
        monkeypatch.setattr(llmc_io, "_exchange", boom)
    else:
        monkeypatch.setattr(llmc_io, "_exchange", lambda a, b: False)   # a platform without renameat2
        monkeypatch.setattr(llmc_io, "_between_renames", boom)
    with pytest.raises(RuntimeError):
        _write(final, "new", overwrite=True)
    assert (final / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_fallback_swap_works(tmp_path, monkeypatch):
    monkeypatch.setattr(llmc_io, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    _write(final, "old")
    _write(final, "new", overwrite=True)
    assert (final / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    final = tmp_path / "out"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for kind, pid in (("tmp", dead), ("tmp", live.pid), ("work", dead)):
            (tmp_path / f".out.llmc-{kind}.{pid}").mkdir()
            (tmp_path / f".out.llmc-{kind}.{pid}" / "shard.safetensors").write_text("partial")
        (tmp_path / ".other.llmc-tmp.1").mkdir()                      # another output's: not ours to judge
        _write(final, "x")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == [".other.llmc-tmp.1", f".out.llmc-tmp.{live.pid}", "out"]
    finally:
        live.kill()
        live.wait()


def test_an_old_output_stranded_by_a_crash_is_put_back(tmp_path):
    final = tmp_path / "out"
    old = tmp_path / f".out.llmc-old.{_dead_pid()}"
    old.mkdir()
    (old / "f.txt").write_text("old")
    assert clean_leftovers(final) == [old]
    assert (final / "f.txt").read_text() == "old" and not old.exists()


def test_sigkill_leftovers_are_cleaned_by_the_next_run(tmp_path):
    """A quantize killed with SIGKILL leaves its temporary directory; the next run removes it."""
    out = tmp_path / "q"
    p = subprocess.Popen([sys.executable, "-m", "llmc", "quantize", str(GOLDEN / "stdlib-llama"), "-o", str(out),
                          "--scheme", "w4a16", "--algo", "gptq", "--calib-samples", "128"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftover = tmp_path / f".q.llmc-tmp.{p.pid}"
    deadline = time.monotonic() + 120
    while not leftover.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert leftover.exists() and not out.exists()
    assert llmc("quantize", STORIES, "-o", out, "--scheme", "w8a16").returncode == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["q"]


def test_check_output_api(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(OutputError, match="is the input"):
        check_output(tmp_path / "m", [tmp_path / "m"])
    with pytest.raises(OutputError, match="already exists"):
        check_output(tmp_path / "m", [])
    assert check_output(tmp_path / "new", [tmp_path / "m"]) == tmp_path / "new"


def test_sigterm_exits_143_and_removes_the_partial_output(tmp_path):
    out = tmp_path / "q"
    p = subprocess.Popen([sys.executable, "-m", "llmc", "quantize", str(GOLDEN / "stdlib-llama"), "-o", str(out),
                          "--scheme", "w4a16", "--algo", "gptq", "--calib-samples", "128"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    leftover = tmp_path / f".q.llmc-tmp.{p.pid}"
    deadline = time.monotonic() + 120
    while not leftover.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated" and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
