"""Atomic writes: the result has the mode a plain open()/mkdir() would give, and a failure leaves nothing."""
from __future__ import annotations

import os
import stat

import pytest

from llmc.io import atomic_directory, write_json_atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_and_directory_modes(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~_umask()
    with atomic_directory(tmp_path / "d") as d:
        (d / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


def test_failed_directory_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "d"):
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
