"""Reading model directories: config.json and lazily opened safetensors (single or sharded).

Weights are read one tensor at a time at the offsets a safetensors header gives, never through
pickle. Every file is checked before use: a regular file inside the model directory
(`llmc.paths`), a bounded JSON document, a safetensors header whose entries are consistent with
each other and with the file's size, so that a damaged or crafted file is a one-line error
naming it, never a hang, a huge allocation or a read past a buffer.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from llmc.errors import ModelFormatError
from llmc.paths import check_regular, open_regular, resolve_inside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model")


INDEX_FILE = "model.safetensors.index.json"

MAX_JSON_BYTES = 64 << 20          # a config, index or manifest larger than this is refused unread
MAX_JSON_DEPTH = 64                # real ones nest a handful of levels; deeper is refused after parsing
MAX_HEADER_BYTES = 100_000_000     # a safetensors header, as safetensors itself bounds it
MAX_RANK = 8                       # dimensions of a stored tensor
MAX_DIM = 1 << 40                  # one dimension of a stored tensor


def short_repr(value: Any, limit: int = 100) -> str:
    """repr(value), cut short: messages stay one readable line whatever a file holds."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _depth(obj: Any, limit: int) -> int:
    """How deeply `obj` (parsed JSON) nests lists and objects, counted up to limit + 1."""
    depth, level = 0, [obj]
    while level and depth <= limit:
        level = [v for o in level if isinstance(o, (dict, list)) for v in (o.values() if isinstance(o, dict) else o)]
        depth += 1
    return depth


def parse_json(raw: bytes, where: Path, what: str, **kwargs: Any) -> Any:
    """JSON from bytes, any failure (syntax, encoding, nesting) a ModelFormatError naming the file."""
    try:
        data = json.loads(raw.decode("utf-8"), **kwargs)
    except RecursionError:
        raise ModelFormatError(f"{where}: {what} is nested too deeply") from None
    except ValueError as e:          # JSONDecodeError, UnicodeDecodeError, too many digits, duplicate keys
        raise ModelFormatError(f"{where}: {what} is not valid JSON ({short_repr(str(e), 120)})") from None
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ModelFormatError(f"{where}: {what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return data


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a regular, readable file of at most MAX_JSON_BYTES (refused unread if larger)."""
    path = Path(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise ModelFormatError(f"{path}: {what} is {size} bytes, more than llmc reads as JSON "
                                   f"({MAX_JSON_BYTES} bytes)")
        try:
            raw = f.read(size + 1)                      # not MAX_JSON_BYTES: read(n) allocates n up front
        except OSError as e:
            raise ModelFormatError(f"{path}: {what} cannot be read ({e.strerror or e})") from None
    if len(raw) > size:
        raise ModelFormatError(f"{path}: {what} changed while it was read")
    data = parse_json(raw, path, what)
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: {what} must be a JSON object")
    return data


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")          # what a plain (not quantized) weight may be stored as


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int                       # absolute byte offsets in the file
    end: int


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0                    # not a bool, a float or a string


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: two entries of one name would be read differently by different readers."""
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {short_repr(k)}")
        seen.add(k)
    return dict(pairs)


def _tensor_entry(path: Path, name: str, t: Any, base: int) -> TensorEntry:
    """One header entry, checked: known dtype; shape a list of at most MAX_RANK dimensions, each an
    int in [0, MAX_DIM]; data_offsets two ints, begin <= end, spanning exactly numel x element size."""
    def bad(why: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: corrupt safetensors header: tensor {short_repr(name)} {why}")
    if not isinstance(t, dict):
        raise bad(f"is {short_repr(t)}, not an object")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelFormatError(f"{path}: tensor {short_repr(name)} has unsupported dtype {short_repr(dtype)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(_is_count(d) and d <= MAX_DIM for d in shape)):
        raise bad(f"has shape {short_repr(shape)}, not a list of at most {MAX_RANK} integers in [0, {MAX_DIM}]")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {short_repr(offsets)}, not [begin, end] with 0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise ModelFormatError(f"{path}: tensor {short_repr(name)} holds {offsets[1] - offsets[0]} bytes, its shape "
                               f"{shape} of {dtype} needs {nbytes}")
    return TensorEntry(dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check it before anything is allocated for the data: a bounded
    header length, every entry well-formed (`_tensor_entry`), no two tensors overlapping, every
    tensor's data inside the file (catches truncation here, naming the file, rather than
    mid-generation)."""
    with open_regular(path, "weight file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise ModelFormatError(f"{path}: not a safetensors file (bad header length)")
        raw = f.read(n)
    if len(raw) != n:
        raise ModelFormatError(f"{path}: truncated while reading its safetensors header")
    header = parse_json(raw, path, "safetensors header", object_pairs_hook=_no_duplicate_keys)
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ModelFormatError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    entries = {name: _tensor_entry(path, name, t, 8 + n) for name, t in header.items()}
    spans = sorted((t.begin, t.end, name) for name, t in entries.items() if t.end > t.begin)
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise ModelFormatError(f"{path}: corrupt safetensors header: tensors {short_repr(a)} and "
                                   f"{short_repr(b)} overlap")
    need = max((t.end for t in entries.values()), default=8 + n)
    if need > size:
        raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes, its header needs {need})")
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
        if os.path.lexists(index):
            return cls._from_map(cls._index(directory))
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            hint = "convert it to safetensors first; llmc never unpickles weights" if pickles else None
            raise ModelFormatError(f"{directory}: no *.safetensors weights found", hint=hint)
        return cls.open_files(directory, shards)

    @staticmethod
    def _index(directory: Path) -> dict[str, Path]:
        """tensor name -> shard, from the index; every shard a file name inside `directory`."""
        index = resolve_inside(directory, INDEX_FILE, "llmc")
        weight_map = read_json(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index}: has no weight_map")
        shards: dict[str, Path] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str):
                raise ModelFormatError(f"{index}: weight_map[{short_repr(name)}] is {short_repr(fname)}, "
                                       "not a file name")
            if fname not in shards:
                shards[fname] = resolve_inside(directory, fname, INDEX_FILE)
        return {name: shards[fname] for name, fname in weight_map.items()}

    @classmethod
    def open_files(cls, directory: Path, names: list[str]) -> "WeightStore":
        """The safetensors files `names` (inside `directory`), every tensor from the file that holds it."""
        files, entries = {}, {}
        for fname in names:
            shard = resolve_inside(directory, fname, "llmc")
            entries[shard] = _read_header(shard)
            files.update({name: shard for name in entries[shard]})
        return cls(files=files, _entries=entries)

    @classmethod
    def _from_map(cls, files: dict[str, Path]) -> "WeightStore":
        """A sharded checkpoint: the index names the file of every tensor."""
        entries = {}
        for path in sorted(set(files.values())):
            if not os.path.lexists(path):
                raise ModelFormatError(f"{path}: weight file named in the index is missing")
            entries[path] = _read_header(path)
        for name, path in files.items():
            if name not in entries[path]:
                raise ModelFormatError(f"{path}: the index says it holds {short_repr(name)} but it does not")
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
        nbytes = e.end - e.begin                         # numel x element size: _read_header checked it
        buf = torch.empty(nbytes, dtype=torch.uint8)
        path = self.files[name]
        try:
            with open_regular(path, "weight file") as f:
                f.seek(e.begin)
                got = f.readinto(memoryview(buf.numpy()))
        except OSError as err:
            raise ModelFormatError(f"{path}: cannot read {name!r} ({err.strerror or err})") from None
        if got != nbytes:
            raise ModelFormatError(f"{path}: truncated while reading {name!r}")
        t = buf.view(DTYPES[e.dtype]).reshape(e.shape)
        if t.is_floating_point() and t.dtype.itemsize > 1 and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelFormatError(f"{path}: {name!r} holds {bad} NaN or infinite value(s)",
                                   hint="the checkpoint is corrupt; llmc does not run non-finite weights")
        return t

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))


def check_path(path: Path | str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise ModelFormatError(f"{p}: is a file, not a model directory",
                               hint="pass a Hugging Face checkpoint directory or an llmc engine directory")
    return p


def check_model_files(p: Path, error: type = ModelFormatError) -> None:
    """The config and tokenizer files `p` has are inside it (or its Hugging Face cache blobs) and
    regular files: they are read by name (and tokenizer.json by the tokenizers library, which would
    block on a FIFO)."""
    for name in ("config.json",) + TOKENIZER_FILES:
        f = resolve_inside(p, name, "llmc", error)
        if os.path.lexists(f):
            check_regular(f, name, error)
