"""Reading model directories: config.json and lazily opened safetensors (single or sharded).

Weights are read through safetensors' mmap, one tensor at a time, never through pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from llmc.errors import ModelFormatError

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: {what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: {what} must be a JSON object")
    return data


def _check_layout(path: Path) -> None:
    """Check the header parses and every tensor's data lies inside the file (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ModelFormatError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFormatError(f"{path}: corrupt safetensors header") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes, its header needs {need})")


def _open(path: Path) -> Any:
    _check_layout(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from None


@dataclass
class WeightStore:
    """name -> tensor, read lazily from one or more safetensors files."""

    files: dict[str, Path]          # tensor name -> file holding it
    _handles: dict[Path, Any]

    @classmethod
    def open(cls, directory: Path) -> "WeightStore":
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = read_json(index, "the safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelFormatError(f"{index}: has no weight_map")
            files = {name: directory / fname for name, fname in weight_map.items()}
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
                hint = "convert it to safetensors first; llmc never unpickles weights" if pickles else None
                raise ModelFormatError(f"{directory}: no *.safetensors weights found", hint=hint)
            return cls.open_files(directory, shards)
        return cls._from_map(files)

    @classmethod
    def open_files(cls, directory: Path, shards: list[Path]) -> "WeightStore":
        files, handles = {}, {}
        for shard in shards:
            if not shard.exists():
                raise ModelFormatError(f"{shard}: weight file is missing")
            handles[shard] = _open(shard)
            files.update({name: shard for name in handles[shard].keys()})
        return cls(files=files, _handles=handles)

    @classmethod
    def _from_map(cls, files: dict[str, Path]) -> "WeightStore":
        """A sharded checkpoint: the index names the file of every tensor."""
        handles = {}
        for path in sorted(set(files.values())):
            if not path.exists():
                raise ModelFormatError(f"{path}: weight file named in the index is missing")
            handles[path] = _open(path)
        for name, path in files.items():
            if name not in handles[path].keys():
                raise ModelFormatError(f"{path}: the index says it holds {name!r} but it does not")
        return cls(files=files, _handles=handles)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> Iterator[str]:
        return iter(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.files[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ModelFormatError(f"weight {name!r} is missing from the checkpoint")
        try:
            return self._handles[self.files[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelFormatError(f"{self.files[name]}: cannot read {name!r} ({e})") from None

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))
