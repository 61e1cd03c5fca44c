"""Quantized weights on disk: `name.qdata`, `name.scale` (and `name.zero`) tensors in safetensors, with
each weight's format and logical shape recorded in the manifest (`quantization_config` in a
checkpoint's config.json, `quantization` in an engine's engine.json).

Format versions (the manifest's `format_version`; llmc writes the newest and reads both):
- 2: scales F16; int4 zero points packed two per byte along the groups, [N, ceil(G / 2)] U8
  (int4 in groups of 32 costs 4.625 bits per weight);
- 1: scales F32; zero points one per byte, [N, G] U8 (5.25 bits per weight in groups of 32).

A format with two-level scales (`TensorQuant.scale_bits`; version 2 on) stores its group scales as
codes, `name.scale` [N, G] U8, and the super scales as `name.super_scale` [N, ceil(G / 8)] F16
(int4 in groups of 32: 4.4375 bits per weight; in groups of 16: 4.875).

`QuantizedStore` wraps a WeightStore and presents every weight under its logical name: a
QuantizedWeight where the weight is quantized, the plain tensor elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from torch import Tensor

from llmc.checkpoint import ITEMSIZE, MAX_DIM, WeightStore, short_repr
from llmc.errors import ConfigError, ModelFormatError
from llmc.quantized.formats import (QuantizedWeight, TensorQuant, decode_scales, group_count, super_count,
                                    unpack_int4)

QUANT_METHOD = "llmc"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class StoredScales:
    """How a format version stores scales and int4 zero points (the codes are the same in all)."""
    scale_dtype: str                     # safetensors dtype
    packed_zeros: bool                   # two 4-bit zero points per byte along the groups

    def zero_width(self, groups: int) -> int:
        return -(-groups // 2) if self.packed_zeros else groups


STORED_SCALES = {1: StoredScales("F32", packed_zeros=False), 2: StoredScales("F16", packed_zeros=True)}

# The shape of the scales of a quantized weight [N, K] (int4's zero points alike, before packing);
# the codes' dtype and packed width come from the number format (formats.NUMBER_FORMATS).
SCALES: dict[str, Callable[[int, int, TensorQuant], tuple[int, int]]] = {
    "channel": lambda n, k, fmt: (n, 1),
    "group": lambda n, k, fmt: (n, group_count(k, fmt.group_size)),
    "tensor": lambda n, k, fmt: (1, 1),
}
ACT_GRANULARITIES = ("token", "group", "tensor")   # token, group: dynamic; tensor: a static act_scale [1]


def _tensor_quant(d: Any, where: str) -> TensorQuant:
    """A TensorQuant from its manifest dict, every field of its JSON type (no bool for an int)."""
    types = {"dtype": (str,), "granularity": (str,), "group_size": (int, type(None)), "symmetric": (bool,),
             "scale_bits": (int, type(None))}
    if not isinstance(d, Mapping):
        raise ModelFormatError(f"{where} is {short_repr(d)}, not an object")
    for k, v in d.items():
        if k not in types:
            raise ModelFormatError(f"{where} has an unknown field {short_repr(k)}")
        if not isinstance(v, types[k]) or (isinstance(v, bool) and bool not in types[k]):
            raise ModelFormatError(f"{where}.{k} is {short_repr(v)}, not of type {types[k][0].__name__}")
    try:
        return TensorQuant(**d)
    except ConfigError as e:
        raise ModelFormatError(f"{where}: {e.message}") from None
    except TypeError:
        raise ModelFormatError(f"{where} lacks its dtype") from None


@dataclass(frozen=True)
class QuantizedEntry:
    fmt: TensorQuant
    shape: tuple[int, int]
    act: TensorQuant | None = None            # the input's run-time format, when it is quantized
    version: int = field(default=FORMAT_VERSION, compare=False)   # the format version it is stored in

    @classmethod
    def of(cls, qw: QuantizedWeight) -> "QuantizedEntry":
        return cls(qw.fmt, qw.shape, qw.act)

    def to_dict(self) -> dict[str, Any]:
        d = {"format": self.fmt.to_dict(), "shape": list(self.shape)}
        if self.act is not None:
            d["activation"] = self.act.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "quantization entry", version: int = FORMAT_VERSION) -> "QuantizedEntry":
        """Checked: a weight format with a stored layout, an activation format the kernels take, and
        a logical shape of two ints in [1, MAX_DIM]."""
        if not isinstance(d, Mapping):
            raise ModelFormatError(f"{where} is {short_repr(d)}, not an object")
        fmt = _tensor_quant(d.get("format"), f"{where}.format")
        if fmt.granularity not in SCALES:
            raise ModelFormatError(f"{where}.format: granularity {fmt.granularity!r} is not a weight granularity "
                                   f"({', '.join(SCALES)})")
        if fmt.two_level and version < 2:
            raise ModelFormatError(f"{where}.format: two-level scales are stored from format version 2 on, "
                                   f"not in version {version}")
        act = _tensor_quant(d["activation"], f"{where}.activation") if d.get("activation") is not None else None
        if act is not None and act.granularity not in ACT_GRANULARITIES:
            raise ModelFormatError(f"{where}.activation: granularity {act.granularity!r} is not an activation "
                                   f"granularity ({', '.join(ACT_GRANULARITIES)})")
        shape = d.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(type(x) is int and 1 <= x <= MAX_DIM for x in shape)):
            raise ModelFormatError(f"{where}.shape is {short_repr(shape)}, not [N, K] of two integers "
                                   f"in [1, {MAX_DIM}]")
        return cls(fmt, (shape[0], shape[1]), act, version)

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """suffix -> (safetensors dtype, shape) of every tensor this weight is stored as, none optional."""
        n, k = self.shape
        number = self.fmt.number
        scales = SCALES[self.fmt.granularity](n, k, self.fmt)
        stored = STORED_SCALES[self.version]
        out = {"qdata": (number.storage, (n, number.packed_width(k))), "scale": (stored.scale_dtype, scales)}
        if self.fmt.two_level:
            out["scale"] = ("U8", scales)
            out["super_scale"] = ("F16", (scales[0], super_count(scales[1])))
        if number.zero_point:                 # stored unsigned: symmetric int4 stores its zero point 8 too
            out["zero"] = ("U8", (scales[0], stored.zero_width(scales[1])))
        if self.act is not None and self.act.granularity == "tensor":
            out["act_scale"] = ("F32", (1,))
        return out

    def nbytes(self) -> int:
        """The bytes its stored tensors take (`layout`)."""
        return sum(ITEMSIZE[dtype] * math.prod(shape) for dtype, shape in self.layout().values())


def entries_from_manifest(section: Any, where: str) -> dict[str, QuantizedEntry]:
    """The per-weight table of a quantization section (`quantization_config` in config.json,
    `quantization` in engine.json), every entry checked (`QuantizedEntry.from_dict`)."""
    if not isinstance(section, Mapping):
        raise ModelFormatError(f"{where}: the quantization section is {short_repr(section)}, not an object")
    if section.get("quant_method") != QUANT_METHOD:
        raise ModelFormatError(f"{where}: quantization method {short_repr(section.get('quant_method'))} is not "
                               f"readable by llmc (it reads {QUANT_METHOD!r})")
    version = section.get("format_version")
    if type(version) is not int or version not in STORED_SCALES:
        raise ModelFormatError(f"{where}: quantized format version {short_repr(version)} is not one llmc reads "
                               f"({', '.join(map(str, STORED_SCALES))})")
    weights = section.get("weights")
    if not isinstance(weights, Mapping):
        raise ModelFormatError(f"{where}: the quantization section's weights is {short_repr(weights)}, not an object")
    return {name: QuantizedEntry.from_dict(e, f"{where}: weights[{short_repr(name)}]", version)
            for name, e in weights.items()}


class QuantizedStore:
    def __init__(self, base: WeightStore, entries: dict[str, QuantizedEntry]) -> None:
        self.base, self.entries = base, entries
        for name, e in entries.items():
            self._check(name, e)

    def _check(self, name: str, e: QuantizedEntry) -> None:
        """The stored tensors of `name` have exactly the dtypes and shapes its format and logical shape
        call for (header only; no data is read), so no kernel reads past a buffer."""
        want = e.layout()
        held = [self.base.files[f"{name}.{p}"] for p in QuantizedWeight.SUFFIXES if f"{name}.{p}" in self.base]
        where = held[0] if held else "the checkpoint"
        for part in QuantizedWeight.SUFFIXES:
            t = f"{name}.{part}"
            if part not in want:
                if t in self.base:
                    raise ModelFormatError(f"{self.base.files[t]}: holds {t}, which a weight in format "
                                           f"{e.fmt.key}{'' if e.act is None else '+' + e.act.key} does not have")
                continue
            if t not in self.base:
                raise ModelFormatError(f"{where}: quantized weight {name!r} lacks its tensor {t}")
            dtype, shape = want[part]
            got = (self.base.dtype(t), tuple(self.base.shape(t)))
            if got != (dtype, shape):
                raise ModelFormatError(f"{self.base.files[t]}: {t} is {got[0]} {list(got[1])}; a {e.fmt.key} weight "
                                       f"of shape {list(e.shape)} stores it as {dtype} {list(shape)}")

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

    def quantized_format(self, name: str) -> tuple[TensorQuant, TensorQuant | None] | None:
        """(weight format, input format) of a quantized weight; None for a plain one."""
        e = self.entries.get(name)
        return None if e is None else (e.fmt, e.act)

    def get(self, name: str) -> Tensor | QuantizedWeight:
        if name not in self.entries:
            return self.base.get(name)
        e = self.entries[name]
        act_scale = self.base.get(f"{name}.act_scale") if f"{name}.act_scale" in self.base else None
        scale, zero, super_scale = self._scales(name)
        return QuantizedWeight.from_tensors(e.fmt, e.shape, self.base.get(f"{name}.qdata"), scale, zero,
                                            e.act, act_scale, super_scale)

    def scales(self, name: str) -> tuple[Tensor, Tensor | None]:
        """A quantized weight's scales (fp32; two-level ones decoded) and zero points (one per byte,
        or None), as in memory; its codes are not read."""
        return self._scales(name)[:2]

    def _scales(self, name: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """`scales`, and the super scales (fp32) of a weight with two-level scales (else None)."""
        e = self.entries[name]
        scale, super_scale = self.base.get(f"{name}.scale"), None
        if e.fmt.two_level:
            super_scale = self.base.get(f"{name}.super_scale").float()
            scale = decode_scales(scale, super_scale)
        else:
            scale = scale.float()
        zero = self.base.get(f"{name}.zero") if f"{name}.zero" in self.base else None
        if zero is not None and STORED_SCALES[e.version].packed_zeros:
            zero = unpack_int4(zero, scale.shape[1]).contiguous()
        return scale, zero, super_scale

    def nbytes(self) -> int:
        return self.base.nbytes()


def manifest_section(entries: Mapping[str, QuantizedEntry], **extra: Any) -> dict[str, Any]:
    """The quantization section of a manifest written now (the newest format version; `extra`, e.g.
    the recipe and provenance of the model it was read from, cannot override what it says)."""
    fixed = ("quant_method", "format_version", "weights")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            **{k: v for k, v in extra.items() if k not in fixed},
            "weights": {n: e.to_dict() for n, e in entries.items()}}
