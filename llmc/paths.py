"""Paths a model or engine names: resolved, kept inside their directory, regular files only.

A checkpoint or engine directory names files (shards in the index, files in engine.json, the
tokenizer files). Each is resolved and must stay inside the directory that names it, so that a
crafted index cannot make llmc read `/etc/passwd` and a planted symlink cannot make it copy a
private file into an output. One exception keeps the Hugging Face cache working: a snapshot
directory (`.../models--ORG--NAME/snapshots/REV/`) whose files are symlinks into the sibling
`.../models--ORG--NAME/blobs/`. Only regular files are read: a FIFO would hang a reader, a
device would stream forever.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

from llmc.errors import ModelFormatError


def _hf_blobs(root: Path) -> Path | None:
    """The blobs directory of a Hugging Face cache snapshot `root`, or None."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent / "blobs"
    return None


def _within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def resolve_inside(root: Path | str, name: str | os.PathLike, what: str, error: type = ModelFormatError) -> Path:
    """`root / name`, refusing a name that is absolute, climbs out with `..`, or resolves (through
    symlinks) outside `root` (but into its Hugging Face cache blobs). The path need not exist.
    `what` is what names the file, for the message: "model.safetensors.index.json", "engine.json"
    ("llmc" for a name llmc itself chose)."""
    root = Path(root)
    rel = Path(name)
    if not str(name) or "\0" in str(name) or rel.is_absolute() or ".." in rel.parts:
        raise error(f"{root}: {what} names {str(name)!r}, a path outside the directory")
    p = root / rel
    try:
        real, real_root = p.resolve(), root.resolve()
    except (OSError, RuntimeError) as e:               # RuntimeError: a symlink loop (Python < 3.13)
        raise error(f"{p}: cannot be resolved ({e.strerror if isinstance(e, OSError) else 'a symlink loop'})") from None
    blobs = _hf_blobs(real_root)
    if not (_within(real, real_root) or (blobs is not None and _within(real, blobs.resolve()))):
        raise error(f"{p}: resolves to {real}, outside {root}")
    return p


def check_regular(p: Path, what: str, error: type = ModelFormatError) -> os.stat_result:
    """Stat `p` (following symlinks) and require a regular file."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{p}: {what} is missing") from None
    except OSError as e:
        raise error(f"{p}: {what} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise error(f"{p}: {what} is {kind}")
    return st


def open_regular(p: Path, what: str, error: type = ModelFormatError) -> BinaryIO:
    """Open `p` for binary reading, a regular file only. The open does not block (a FIFO swapped in
    after `check_regular` is refused by the fstat, not waited on); reads block as usual."""
    check_regular(p, what, error)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise error(f"{p}: {what} is missing") from None
    except OSError as e:
        raise error(f"{p}: {what} cannot be read ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{p}: {what} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def bytes_on_disk(path: Path | str) -> int:
    """The bytes of a checkpoint or engine: every regular file under the directory (or the file)."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def copy_model_file(src_root: Path, name: str, dst_dir: Path) -> bool:
    """Copy `src_root/name` into `dst_dir` if it exists: resolved inside `src_root`, a regular file,
    written with a normal file's mode (not the source's). Returns whether it was copied."""
    src = resolve_inside(src_root, name, "llmc")
    if not os.path.lexists(src):
        return False
    with open_regular(src, "a model file") as f, open(Path(dst_dir) / name, "wb") as out:
        shutil.copyfileobj(f, out)
    return True
