"""Quantized weights on disk: `name.qdata`, `name.scale` (and `name.zero`) tensors in safetensors, with
each weight's format and logical shape recorded in the manifest (`quantization_config` in a
checkpoint's config.json, `quantization` in an engine's engine.json).

`QuantizedStore` wraps a WeightStore and presents every weight under its logical name: a
QuantizedWeight where the weight is quantized, the plain tensor elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from torch import Tensor

from llmc.checkpoint import WeightStore
from llmc.errors import ModelFormatError
from llmc.passes.quant.formats import QuantizedWeight
from llmc.passes.quant.scheme import TensorQuant

QUANT_METHOD = "llmc"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantizedEntry:
    fmt: TensorQuant
    shape: tuple[int, int]
    act: TensorQuant | None = None            # the input's run-time format, when it is quantized

    @classmethod
    def of(cls, qw: QuantizedWeight) -> "QuantizedEntry":
        return cls(qw.fmt, qw.shape, qw.act)

    def to_dict(self) -> dict[str, Any]:
        d = {"format": self.fmt.to_dict(), "shape": list(self.shape)}
        if self.act is not None:
            d["activation"] = self.act.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantizedEntry":
        act = TensorQuant(**d["activation"]) if d.get("activation") else None
        return cls(TensorQuant(**d["format"]), (int(d["shape"][0]), int(d["shape"][1])), act)


def entries_from_manifest(section: Mapping[str, Any], where: str) -> dict[str, QuantizedEntry]:
    if section.get("quant_method") != QUANT_METHOD:
        raise ModelFormatError(f"{where}: quantization method {section.get('quant_method')!r} is not readable "
                               f"by llmc (it reads {QUANT_METHOD!r})")
    if section.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{where}: quantized format version {section.get('format_version')!r} is not "
                               f"{FORMAT_VERSION}")
    try:
        return {name: QuantizedEntry.from_dict(e) for name, e in section["weights"].items()}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelFormatError(f"{where}: malformed quantization entry ({e})") from None


class QuantizedStore:
    def __init__(self, base: WeightStore, entries: dict[str, QuantizedEntry]) -> None:
        self.base, self.entries = base, entries
        for name in entries:
            for part in ("qdata", "scale"):
                if f"{name}.{part}" not in base:
                    raise ModelFormatError(f"quantized weight {name!r} lacks its tensor {name}.{part}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.base

    def names(self) -> Iterator[str]:
        hidden = {f"{n}.{s}" for n in self.entries for s in QuantizedWeight.SUFFIXES}
        yield from self.entries
        yield from (n for n in self.base.names() if n not in hidden)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape if name in self.entries else self.base.shape(name)

    def dtype(self, name: str) -> str:
        return self.entries[name].fmt.key if name in self.entries else self.base.dtype(name)

    def get(self, name: str) -> Tensor | QuantizedWeight:
        if name not in self.entries:
            return self.base.get(name)
        e = self.entries[name]
        def optional(part: str):
            return self.base.get(f"{name}.{part}") if f"{name}.{part}" in self.base else None
        return QuantizedWeight.from_tensors(e.fmt, e.shape, self.base.get(f"{name}.qdata"),
                                            self.base.get(f"{name}.scale"), optional("zero"), e.act,
                                            optional("act_scale"))

    def nbytes(self) -> int:
        return self.base.nbytes()


def manifest_section(entries: Mapping[str, QuantizedEntry], **extra: Any) -> dict[str, Any]:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **extra,
            "weights": {n: e.to_dict() for n, e in entries.items()}}
