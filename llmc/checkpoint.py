"""Reading model directories: config.json and lazily opened safetensors (single or sharded).

Weights are read through safetensors' mmap, one tensor at a time, never through pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

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


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int                       # absolute byte offsets in the file
    end: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check every tensor's data lies inside the file (catches
    truncation here, naming the file, rather than mid-generation)."""
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
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header")
    entries = {}
    try:
        for name, t in header.items():
            if name == "__metadata__":
                continue
            b, e = (int(x) for x in t["data_offsets"])
            entries[name] = TensorEntry(str(t["dtype"]), tuple(int(d) for d in t["shape"]), 8 + n + b, 8 + n + e)
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"{path}: corrupt safetensors header") from None
    need = max((t.end for t in entries.values()), default=8 + n)
    if need > size:
        raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes, its header needs {need})")
    for name, t in entries.items():
        if t.dtype not in DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
    return entries


@dataclass
class WeightStore:
    """name -> tensor, read one at a time from one or more safetensors files.

    Tensors are read with plain file reads at the offsets the header gives, not through a memory
    map, so a tensor's bytes stay in the process only while something holds the tensor: walking
    a model larger than RAM layer by layer keeps one layer resident."""

    files: dict[str, Path]          # tensor name -> file holding it
    _entries: dict[Path, dict[str, TensorEntry]]

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
        files, entries = {}, {}
        for shard in shards:
            if not shard.exists():
                raise ModelFormatError(f"{shard}: weight file is missing")
            entries[shard] = _read_header(shard)
            files.update({name: shard for name in entries[shard]})
        return cls(files=files, _entries=entries)

    @classmethod
    def _from_map(cls, files: dict[str, Path]) -> "WeightStore":
        """A sharded checkpoint: the index names the file of every tensor."""
        entries = {}
        for path in sorted(set(files.values())):
            if not path.exists():
                raise ModelFormatError(f"{path}: weight file named in the index is missing")
            entries[path] = _read_header(path)
        for name, path in files.items():
            if name not in entries[path]:
                raise ModelFormatError(f"{path}: the index says it holds {name!r} but it does not")
        return cls(files=files, _entries=entries)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> Iterator[str]:
        return iter(self.files)

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.files:
            raise ModelFormatError(f"weight {name!r} is missing from the checkpoint")
        return self._entries[self.files[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        return self._entry(name).dtype

    def get(self, name: str) -> torch.Tensor:
        e = self._entry(name)
        dtype = DTYPES[e.dtype]
        numel = 1
        for d in e.shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if e.end - e.begin != nbytes:
            raise ModelFormatError(f"{self.files[name]}: {name!r} holds {e.end - e.begin} bytes, its shape "
                                   f"{list(e.shape)} of {e.dtype} needs {nbytes}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with open(self.files[name], "rb") as f:
                f.seek(e.begin)
                got = f.readinto(memoryview(buf.numpy()))
        except OSError as err:
            raise ModelFormatError(f"{self.files[name]}: cannot read {name!r} ({err})") from None
        if got != nbytes:
            raise ModelFormatError(f"{self.files[name]}: truncated while reading {name!r}")
        return buf.view(dtype).reshape(e.shape)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))
