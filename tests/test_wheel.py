"""The wheel carries llmc's package data (the bundled profiles, the default calibration text, the C
kernel sources), and llmc installed from it finds that data from outside the repository.

The wheel is installed without dependencies into a fresh venv, which borrows torch and the rest
from this interpreter's site-packages through a .pth file instead of downloading them. The
editable llmc of this venv cannot shadow the wheel: its import hook is installed by a .pth file of
that site-packages, and Python does not process .pth files in directories that another .pth adds.
The test checks where llmc is imported from all the same.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import STORIES

REPO = Path(__file__).resolve().parent.parent
PROFILES = sorted(p.stem for p in (REPO / "profiles").glob("*.toml"))
CALIBRATION = REPO / "llmc" / "data" / "tinystories_calib.txt"
# Built from a copy: an in-tree build writes build/ and *.egg-info into the checkout, and a stale build/lib can
# put deleted files into the wheel.
NOT_BUILD_INPUT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "golden", "tests", "benchmarks",
                                         "*.egg-info", "__pycache__", ".pytest_cache")


def run(args: list, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command outside the repository, with no PYTHONPATH that could reach the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["COLUMNS"] = "400"                                     # error lines unwrapped
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def build_wheel(root: Path) -> Path:
    """`pip wheel` of a copy of the source tree; pip fetches the build backend (setuptools) if it isolates."""
    src = root / "src"
    shutil.copytree(REPO, src, ignore=NOT_BUILD_INPUT)
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--quiet", "-w", root / "dist"], cwd=root)
    (wheel,) = (root / "dist").glob("llmc-*.whl")
    return wheel


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed (--no-deps), then this interpreter's site-packages added by a
    .pth file. The wheel goes in first, so pip never sees (or touches) this venv's editable llmc."""
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
        cwd=root)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "llmc-test-borrowed-deps.pth").write_text("".join(f"{p}\n" for p in borrowed))
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The fresh venv holding llmc from the wheel."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip(f"pip is not installed in {sys.executable}: cannot build the wheel")
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"llmc/bundled_profiles/{n}.toml" for n in PROFILES} | {
        "llmc/data/tinystories_calib.txt", "llmc/data/README.md",
        *(f"llmc/kernels/cpu/{c.name}" for c in (REPO / "kernels" / "cpu").glob("*.c"))}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    return fresh_venv(root, wheel)


def test_installed_llmc_is_the_wheel(installed, tmp_path):
    probe = ("import json, llmc, torch; from llmc.profiles import PROFILE_DIR, available_profiles; "
             "from llmc.resources import default_calibration; "
             "print(json.dumps([llmc.__file__, str(PROFILE_DIR), str(default_calibration()), available_profiles()]))")
    module, profile_dir, calibration, names = json.loads(run([installed / "bin" / "python", "-c", probe],
                                                             cwd=tmp_path).stdout)
    for path in (module, profile_dir, calibration):
        assert Path(path).is_relative_to(installed), path
    assert names == PROFILES


def test_quantize_with_a_bundled_profile_and_the_packaged_calibration(installed, tmp_path):
    out = run([installed / "bin" / "llmc", "quantize", STORIES, "-o", tmp_path / "q", "--profile", "int4-gptq",
               "--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "64", "--json"], cwd=tmp_path)
    r = json.loads(out.stdout)
    assert r["profile"] == "int4-gptq" and r["recipe"]["algorithm"] == "gptq"
    assert r["recipe"]["scheme"]["name"] == "w4a16" and r["recipe"]["scheme"]["weight"]["group_size"] == 32
    calib = r["calibration"]
    assert Path(calib["file"]).is_relative_to(installed), calib["file"]
    assert calib["sha256"] == hashlib.sha256(CALIBRATION.read_bytes()).hexdigest()
    assert (calib["samples"], calib["seqlen"]) == (4, 64)


def test_unknown_profile_lists_every_bundled_one(installed, tmp_path):
    p = run([installed / "bin" / "llmc", "quantize", STORIES, "-o", tmp_path / "q", "--profile", "no-such"],
            cwd=tmp_path, check=False)
    assert p.returncode == 2
    assert f"bundled: {', '.join(PROFILES)} " in " ".join(p.stderr.split())
