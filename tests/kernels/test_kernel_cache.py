"""The native kernel cache: when a cached library is trusted and loaded, when it is rebuilt, and the
fallbacks (a private temporary build, then torch) with their single warning line.

Most tests build a stub with the same exported symbols as gemm.c (a fraction of a second); only the
tests that need a real process build gemm.c itself, once for the module (two racing builders)."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llmc.kernels.cpu import native

LIB, DIGEST = "libllmc_cpu.so", "libllmc_cpu.so.sha256"
ABI = getattr(native, "ABI_VERSION", 1)
TORCH_ONLY = "; CPU kernels use torch matmul only"
BUILD_AND_RUN = """
import torch
from llmc.kernels.cpu import native
lib = native.library()
assert lib is not None, native.status()
x, w = torch.randn(3, 40), torch.randn(5, 40)
torch.testing.assert_close(native.linear(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
print(lib.llmc_abi_version())
"""


def _stub_source(abi: int, dequant: bool = True, marker: Path | None = None) -> str:
    """A library exporting every symbol native.SIGNATURES names (but llmc_dequant_i4g unless `dequant`)."""
    lines = [f"int llmc_abi_version(void) {{ return {abi}; }}"]
    lines += [f"void {name}(void) {{}}" for name in native.SIGNATURES
              if name != "llmc_abi_version" and (dequant or name != "llmc_dequant_i4g")]
    if marker is not None:                          # a planted library's constructor runs as the caller
        lines += ["#include <stdio.h>",
                  f'__attribute__((constructor)) static void planted(void) {{ fclose(fopen("{marker}", "w")); }}']
    return "\n".join(lines) + "\n"


def _compile_stub(out: Path, **kw) -> bytes:
    src = out.with_suffix(".c")
    src.write_text(_stub_source(**kw))
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    return out.read_bytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plant(key_dir: Path, data: bytes) -> None:
    """Replace the cached library by `data`, with a matching digest: only the other checks can refuse it."""
    (key_dir / LIB).write_bytes(data)
    (key_dir / DIGEST).write_text(f"{_sha256(data)}  {LIB}\n")


def _key_dir(root: Path) -> Path:
    [lib] = root.glob(f"kernels/*/{LIB}")
    return lib.parent


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _only_warning(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmc: warning: "), lines
    return lines[0]


def _run(root: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, LLMC_CACHE_DIR=str(root), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", BUILD_AND_RUN], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh library() per test; HOME and the temporary directory inside tmp_path."""
    native.library.cache_clear()
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    yield
    native.library.cache_clear()


@pytest.fixture
def stub(tmp_path, monkeypatch) -> Path:
    """native builds a stub with gemm.c's symbols instead of gemm.c: the same cache logic, in 0.1 s."""
    src = tmp_path / "stub.c"
    src.write_text(_stub_source(ABI))
    monkeypatch.setattr(native, "SOURCES", (src,))
    return src


@pytest.fixture
def stub_cache(tmp_path, monkeypatch, stub, capsys) -> Path:
    """A verified stub cache in $LLMC_CACHE_DIR, built under another root and copied, so this process
    has never loaded the copy. Returns its key directory."""
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "first"))
    assert native.library() is not None, native.status()
    native.library.cache_clear()
    shutil.copytree(tmp_path / "first", tmp_path / "cache", symlinks=True)
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    assert capsys.readouterr().err == ""
    return _key_dir(tmp_path / "cache")


def _built_privately(lib, tmp_path) -> bool:
    return lib is not None and Path(lib._name).is_relative_to(tmp_path / "tmp")


@pytest.fixture(scope="module")
def racing_build(tmp_path_factory):
    """gemm.c built for real, by two processes started together on the same empty cache."""
    root = tmp_path_factory.mktemp("racing") / "cache"
    procs = [_run(root) for _ in range(2)]
    return root, [(p.wait(timeout=300), *p.communicate()) for p in procs]


# --- verification: digest, ABI version, symbols ---------------------------------------------------

def test_racing_builders_both_load_one_verified_library(racing_build):
    root, results = racing_build
    for rc, out, err in results:
        assert rc == 0 and out.strip() == str(ABI) and "warning" not in err, (rc, out, err)
    key_dir = _key_dir(root)
    assert (key_dir / DIGEST).read_text().split()[0] == _sha256((key_dir / LIB).read_bytes())
    assert sorted(p.name for p in key_dir.iterdir()) == [LIB, DIGEST]          # no temp file left behind


def test_cache_directories_and_files_are_private(racing_build):
    root, _ = racing_build
    key_dir = _key_dir(root)
    assert [_mode(d) for d in (root, root / "kernels", key_dir)] == [0o700] * 3
    assert (_mode(key_dir / LIB), _mode(key_dir / DIGEST)) == (0o700, 0o600)


def test_truncated_library_is_rebuilt_not_mapped(racing_build, tmp_path):
    """Mapping a truncated library kills the process with SIGBUS: it must never be loaded."""
    root = tmp_path / "cache"
    shutil.copytree(racing_build[0], root, symlinks=True)
    lib = _key_dir(root) / LIB
    whole = lib.read_bytes()
    os.truncate(lib, len(whole) // 2)
    p = _run(root)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and err == "", (p.returncode, err)
    assert lib.read_bytes() == whole


@pytest.mark.parametrize("damage", ["garbage", "digest-missing", "digest-differs"])
def test_damaged_cache_is_rebuilt(stub_cache, damage):
    lib, digest = stub_cache / LIB, stub_cache / DIGEST
    good = lib.read_bytes()
    if damage == "garbage":
        lib.write_bytes(b"\x7fELF" + b"\0" * (len(good) - 4))
    elif damage == "digest-missing":
        digest.unlink()
    else:
        digest.write_text(f"{_sha256(b'another build')}  {LIB}\n")
    assert native.library() is not None, native.status()
    assert lib.read_bytes() == good and digest.read_text().split()[0] == _sha256(good)


@pytest.mark.parametrize("defect", ["older-abi", "symbol-missing"])
def test_library_with_other_abi_or_missing_symbol_is_rebuilt(stub_cache, tmp_path, defect):
    bad = _compile_stub(tmp_path / "bad.so", abi=ABI - 1 if defect == "older-abi" else ABI,
                        dequant=defect != "symbol-missing")
    _plant(stub_cache, bad)
    lib = native.library()
    assert lib is not None and lib.llmc_abi_version() == ABI and hasattr(lib, "llmc_dequant_i4g")
    assert (stub_cache / LIB).read_bytes() != bad


def test_verified_cache_is_loaded_without_a_rebuild(stub_cache, monkeypatch):
    before = (stub_cache / LIB).stat()
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("compiled although the cache is valid"))
    assert native.library() is not None
    after = (stub_cache / LIB).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_fresh_build_with_another_abi_falls_back_to_torch(stub, monkeypatch, capsys):
    monkeypatch.setattr(native, "ABI_VERSION", ABI + 1, raising=False)
    assert native.library() is None
    assert "ABI" in native.status()["error"]
    assert _only_warning(capsys).endswith(TORCH_ONLY)


# --- an unusable cache: a private temporary build, else torch --------------------------------------

@pytest.mark.parametrize("where", ["cache", "cache/kernels"])
def test_file_in_place_of_cache_dir_builds_privately(stub, tmp_path, capsys, where):
    (tmp_path / where).parent.mkdir(mode=0o700, exist_ok=True)
    (tmp_path / where).write_text("not a directory")
    lib = native.library()
    assert _built_privately(lib, tmp_path), lib
    assert _mode(Path(lib._name).parent) == 0o700
    line = _only_warning(capsys)
    assert str(tmp_path / where) in line and "not a directory" in line


@pytest.mark.parametrize("home", ["unset", "missing"])
def test_unset_or_missing_home_builds_privately(stub, tmp_path, monkeypatch, capsys, home):
    monkeypatch.delenv("LLMC_CACHE_DIR")
    if home == "unset":
        monkeypatch.delenv("HOME")
    else:
        monkeypatch.setenv("HOME", str(tmp_path / "gone"))
    assert _built_privately(native.library(), tmp_path)
    assert "HOME" in _only_warning(capsys)
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories; "
                    "test_file_in_place_of_cache_dir_builds_privately covers an unwritable cache as root")
def test_read_only_cache_builds_privately(stub, tmp_path, capsys):
    (tmp_path / "cache").mkdir(mode=0o500)
    assert _built_privately(native.library(), tmp_path)
    assert str(tmp_path / "cache") in _only_warning(capsys)


@pytest.mark.parametrize("denied", ["mkdir", "open"])
def test_unwritable_cache_builds_privately(stub_cache, tmp_path, monkeypatch, capsys, denied):
    """EACCES inside the cache, as a read-only directory gives a user who is not root."""
    cache = tmp_path / "cache"
    if denied == "mkdir":
        shutil.rmtree(cache / "kernels")
    else:
        (stub_cache / LIB).unlink()                                   # the next run builds
    real = getattr(os, denied)

    def deny(path, *a, **kw):
        if Path(path).is_relative_to(cache):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, denied, deny)
    assert _built_privately(native.library(), tmp_path)
    line = _only_warning(capsys)
    assert str(cache) in line and "Permission denied" in line


def test_no_private_directory_either_falls_back_to_torch(stub, tmp_path, monkeypatch, capsys):
    (tmp_path / "cache").write_text("not a directory")

    def no_mkdtemp(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkdtemp", no_mkdtemp)
    assert native.library() is None
    status = native.status()
    assert not status["native_gemm"] and "not a directory" in status["error"] and "temporary" in status["error"]
    assert _only_warning(capsys).endswith(TORCH_ONLY)


# --- trust: owner and mode of every directory and file ---------------------------------------------

@pytest.mark.parametrize("unsafe", ["root", "kernels", "key", "library", "digest"])
def test_planted_library_in_writable_place_is_refused(stub_cache, tmp_path, capsys, unsafe):
    marker = tmp_path / "constructor-ran"
    _plant(stub_cache, _compile_stub(tmp_path / "planted.so", abi=ABI, marker=marker))
    path = {"root": tmp_path / "cache", "kernels": tmp_path / "cache" / "kernels", "key": stub_cache,
            "library": stub_cache / LIB, "digest": stub_cache / DIGEST}[unsafe]
    path.chmod(0o777 if path.is_dir() else 0o666)
    assert _built_privately(native.library(), tmp_path)
    assert not marker.exists()
    line = _only_warning(capsys)
    assert str(path) in line and "writable by group or others" in line


def test_cache_owned_by_another_user_is_refused(stub_cache, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "constructor-ran"
    _plant(stub_cache, _compile_stub(tmp_path / "planted.so", abi=ABI, marker=marker))
    owner = (tmp_path / "cache").stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)          # tests run as root: pretend otherwise
    assert _built_privately(native.library(), tmp_path)
    assert not marker.exists()
    line = _only_warning(capsys)
    assert str(tmp_path / "cache") in line and f"owned by uid {owner}" in line


# --- temp files of builders that died ---------------------------------------------------------------

def test_temp_files_of_dead_builders_are_removed(stub_cache, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    host = socket.gethostname()
    try:
        names = {n: stub_cache / n for n in (f".{LIB}.{host}.{dead.pid}.tmp", f".{DIGEST}.{host}.{dead.pid}.tmp",
                                             f".{LIB}.{host}.{live.pid}.tmp", f".{LIB}.other-host.{dead.pid}.tmp",
                                             "notes.txt")}
        for p in names.values():
            p.write_text("partial")
        (stub_cache / LIB).unlink()                                   # the next run builds
        assert native.library() is not None
        left = sorted(p.name for p in stub_cache.iterdir())
    finally:
        live.kill()
        live.wait()
    assert left == sorted([LIB, DIGEST, f".{LIB}.{host}.{live.pid}.tmp", f".{LIB}.other-host.{dead.pid}.tmp",
                           "notes.txt"])


# --- no compiler ------------------------------------------------------------------------------------

def test_no_compiler_warns_once_and_status_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "home"))               # an empty directory
    assert native.library() is None and native.library() is None
    assert _only_warning(capsys) == f"llmc: warning: no C compiler (cc/gcc) on PATH{TORCH_ONLY}"
    assert native.status() == {"native_gemm": False, "max_rows": native.MAX_ROWS,
                               "error": "no C compiler (cc/gcc) on PATH"}
