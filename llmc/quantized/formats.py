"""Number formats, registered by name (`NUMBER_FORMATS`: how a range becomes a scale and zero
point, how values become codes, how codes are packed for storage); `TensorQuant`, the number format
of one tensor; `QuantizedWeight`, the typed value a quantized weight is (packed data, scales, zero
points, format) that serializes to plain safetensors tensors; and round-to-nearest quantization.
Reading the values back is the reference kernel `llmc.kernels.reference.dequant.dequantize`.

Conventions (every format, exact):
- weights are [N, K] (out features, in features); scales run along N (channel) or along N and
  groups of K (group: G = ceil(K / group_size), the last group may be partial).
- rounding is round-half-to-even (`torch.round`).
- int8: symmetric, q in [-127, 127], scale = absmax / 127.
- int4: stored unsigned u in [0, 15] with a zero point z; w ~ (u - z) * scale.
  symmetric: scale = absmax / 8, z = 8 or 7 (`_int4_params`); asymmetric: scale = (max - min) / 15
  over [min(w, 0), max(w, 0)], z = round(-min / scale), and where that is 0, z = 1 with scale
  max / 14. Packed two per byte, low nibble first.
- fp8_e4m3: scale = absmax / 448, q = clamp(w / scale, +-448) cast to float8_e4m3fn (saturating).
- an all-zero row or group gets scale 1 (so q = 0 and the dequantized value is exactly 0).
- scales are float16 values (held as fp32 in memory, stored as F16): every scale is rounded to
  float16 where it is made, so codes are found against the scale that is stored.
- two-level scales (int4 groups, `scale_bits=8`, as llama.cpp's k-quants): each run of
  SUPER_GROUPS groups of a row (a super-block) has a float16 super scale d, the largest of its
  groups' scales, and each group's scale is a code c in [1, 255]: scale = c * (d / 255), computed
  in fp32 in that order (a kernel computes d / 255 once per super-block). The codes are found
  against that scale. A group whose codes all equal its zero point (all zero) takes c = 1 and plays
  no part in d.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from llmc.errors import ConfigError, LlmcError, OptionError
from llmc.registry import Registry

FP8_MAX = 448.0
MAX_GROUP_SIZE = 1 << 16                 # larger groups buy nothing over per-channel scales
SUPER_GROUPS = 8                         # groups per super-block of two-level scales
SCALE_BITS = (8,)                        # the widths of two-level scale codes (one byte each)
GRANULARITIES = ("tensor", "channel", "group", "token")


class QuantizationError(LlmcError):
    """A tensor cannot be quantized (NaN/Inf values, an unsupported shape)."""


def _safe(scale: Tensor) -> Tensor:
    """The scale as stored: rounded to float16 (a scale beyond its range becomes inf, which
    `from_codes` refuses), and 1 where it is 0 (an all-zero row or group, or one below float16's
    smallest subnormal, whose codes are then all 0)."""
    scale = scale.to(torch.float16).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def pack_int4(u: Tensor) -> Tensor:
    """u [N, K] uint8 in [0, 15] -> [N, ceil(K / 2)] uint8, element 2i in the low nibble."""
    n, k = u.shape
    if k % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]


def _int8_params(lo: Tensor, hi: Tensor, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    return _safe(torch.maximum(lo.abs(), hi.abs()) / 127.0), None


def _fp8_params(lo: Tensor, hi: Tensor, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    return _safe(torch.maximum(lo.abs(), hi.abs()) / FP8_MAX), None


def _int4_params(lo: Tensor, hi: Tensor, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Symmetric int4 spends all 16 levels, as llama.cpp's Q4_0: scale = absmax / 8, and the value of
    largest magnitude lands on the 8th step of its side: zero point 8 when it is negative (code 0 is
    -8 steps), 7 when it is positive (code 15 is +8 steps); the other side reaches 7 steps. An
    absmax / 7 grid with zero 8 leaves code 0 unused: 15 levels, 1.27x the weight MSE (measured).
    Asymmetric: the range [min(lo, 0), max(hi, 0)] in 15 steps, zero point rounded, at least 1."""
    if symmetric:
        scale = _safe(torch.maximum(lo.abs(), hi.abs()) / 8.0)
        return scale, torch.where(hi > -lo, 7.0, 8.0)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = _safe((hi - lo) / 15.0)
    zero = torch.round(-lo / scale).clamp(0, 15)
    # zero point 0 (a range that starts at or just below 0) becomes 1 over [-hi / 14, hi]: one level
    # below 0 unused, and every zero point fits the GPTQ layout, which stores zero - 1
    low = zero == 0
    return torch.where(low, _safe(hi / 14.0), scale), torch.where(low, 1.0, zero)


@dataclass(frozen=True)
class NumberFormat:
    """One number format: how a value is encoded (scale and zero point from a range, codes), and how
    codes are stored (packing into the `qdata` tensor). Decoding is shared: (code - zero) * scale."""
    name: str
    storage: str                                            # safetensors dtype of the stored codes
    code_dtype: torch.dtype                                 # the codes, before packing
    params: Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor | None]]   # (lo, hi, symmetric)
    encode: Callable[[Tensor, Tensor, Tensor | None], Tensor]                # (x, scale, zero) -> codes
    pack: Callable[[Tensor], Tensor] = lambda c: c          # codes [N, K] -> stored [N, K']
    unpack: Callable[[Tensor, int], Tensor] = lambda d, k: d
    packed_width: Callable[[int], int] = lambda k: k
    zero_point: bool = False                                # stores a zero point (even when symmetric)
    asymmetric: bool = False                                # may be asymmetric at all


NUMBER_FORMATS: Registry[NumberFormat] = Registry("number format")


def register_number_format(f: NumberFormat) -> NumberFormat:
    return NUMBER_FORMATS.add(f.name, f)


register_number_format(NumberFormat(
    "int8", "I8", torch.int8, _int8_params, lambda x, s, z: torch.round(x / s).clamp(-127, 127).to(torch.int8)))
register_number_format(NumberFormat(
    "int4", "U8", torch.uint8, _int4_params, lambda x, s, z: (torch.round(x / s) + z).clamp(0, 15).to(torch.uint8),
    pack=pack_int4, unpack=unpack_int4, packed_width=lambda k: -(-k // 2), zero_point=True, asymmetric=True))
register_number_format(NumberFormat(
    "fp8_e4m3", "F8_E4M3", torch.float8_e4m3fn, _fp8_params,
    lambda x, s, z: (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)))


@dataclass(frozen=True, kw_only=True)
class TensorQuant:                                     # the number format of a tensor, nothing else
    dtype: Literal["int8", "int4", "fp8_e4m3"]
    granularity: Literal["tensor", "channel", "group", "token"] = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale_bits: int | None = field(default=None, metadata={"omitted_when_default": True})  # two-level scales

    def __post_init__(self) -> None:
        if self.dtype not in NUMBER_FORMATS:
            raise ConfigError(f"unknown number format {self.dtype!r}; known: {', '.join(NUMBER_FORMATS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ConfigError("group_size must be set exactly when granularity is 'group'")
        if self.group_size is not None and not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise OptionError("group_size", f"must be in [1, {MAX_GROUP_SIZE}], got {self.group_size}")
        if not self.symmetric and not self.number.asymmetric:
            raise ConfigError(f"{self.dtype} is symmetric-only in llmc; drop symmetric=False")
        if self.scale_bits is not None and (self.scale_bits not in SCALE_BITS or self.dtype != "int4"
                                            or self.granularity != "group"):
            raise ConfigError(f"two-level scales are {'/'.join(map(str, SCALE_BITS))}-bit codes of int4 groups; "
                              f"not scale_bits={self.scale_bits} for {self.dtype} {self.granularity}-wise")

    @property
    def number(self) -> NumberFormat:
        return NUMBER_FORMATS[self.dtype]

    @property
    def key(self) -> str:
        """The kernel registry key: number layout, no algorithm."""
        sym = "" if self.symmetric else "-asym"
        return f"{self.dtype}/{self.granularity}{sym}"

    @property
    def two_level(self) -> bool:
        return self.scale_bits is not None

    def to_dict(self) -> dict[str, Any]:
        """Its fields; one added later (scale_bits) only when set, so a format that does not use it
        is stored as before and older readers still read it."""
        return plain_fields(self)


def plain_fields(value: Any) -> dict[str, Any]:
    """A dataclass's fields in declaration order, without those marked `omitted_when_default` that
    hold their default (nested dataclasses alike; tuples as lists)."""
    def plain(v: Any) -> Any:
        if is_dataclass(v):
            return plain_fields(v)
        return [plain(x) for x in v] if isinstance(v, tuple) else v
    return {f.name: plain(getattr(value, f.name)) for f in fields(value)
            if not (f.metadata.get("omitted_when_default") and getattr(value, f.name) == f.default)}


def _check_finite(w: Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{name}: has NaN or Inf values; refusing to quantize it")


def group_count(k: int, group_size: int) -> int:
    return -(-k // group_size)


def grouped(w: Tensor, group_size: int) -> Tensor:
    """[N, K] -> [N, G, group_size], the partial last group padded with zeros (which never change
    a group's absmax, min(., 0) or max(., 0))."""
    n, k = w.shape
    g = group_count(k, group_size)
    pad = g * group_size - k
    return torch.nn.functional.pad(w, (0, pad)).reshape(n, g, group_size)


def ungrouped(x: Tensor, k: int) -> Tensor:
    return x.reshape(x.shape[0], -1)[:, :k]


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    fmt: TensorQuant
    shape: tuple[int, int]              # logical [N, K]
    data: Tensor                        # int8 [N, K] | uint8 packed [N, ceil(K/2)] | float8 [N, K]
    scale: Tensor                       # fp32 [N, 1] (channel), [N, G] (group) or [1, 1] (tensor)
    zero: Tensor | None = None          # uint8 [N, G] zero points (int4 only)
    act: TensorQuant | None = None      # how the input is quantized at run time (None: it is not)
    act_scale: Tensor | None = None     # fp32 [1] static per-tensor input scale (calibrated)
    super_scale: Tensor | None = None   # fp32 [N, S] two-level scales' super scales (`scale` is decoded)

    SUFFIXES = ("qdata", "scale", "zero", "act_scale", "super_scale")

    @property
    def kernel_key(self) -> str:
        """The kernel registry key: weight format, and the input's format when it is quantized."""
        return self.fmt.key if self.act is None else f"{self.fmt.key}+{self.act.key}"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero, self.act_scale,
                                                           self.super_scale) if t is not None)

    def to_device(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with every tensor on `device` (the same tensors where they are there already)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)
        return QuantizedWeight(self.fmt, self.shape, move(self.data), move(self.scale), move(self.zero), self.act,
                               move(self.act_scale), move(self.super_scale))

    def rows(self, rows: Tensor) -> "QuantizedWeight":
        """The weight of rows `rows` only (channel- or group-wise)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]
        return QuantizedWeight(self.fmt, (len(rows), self.shape[1]), self.data[rows], self.scale[rows],
                               pick(self.zero), self.act, self.act_scale, pick(self.super_scale))

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The tensors it is stored as: the codes, F16 scales (two-level: U8 scale codes and F16 super
        scales) and the zero points packed two per byte along the groups (as the codes are along K);
        `llmc.quantized.store` reads them back."""
        if self.fmt.two_level:
            out = {f"{name}.qdata": self.data, f"{name}.scale": scale_codes(self.scale, self.super_scale),
                   f"{name}.super_scale": self.super_scale.to(torch.float16)}
        else:
            out = {f"{name}.qdata": self.data, f"{name}.scale": self.scale.to(torch.float16)}
        if self.zero is not None:
            out[f"{name}.zero"] = pack_int4(self.zero)
        if self.act_scale is not None:
            out[f"{name}.act_scale"] = self.act_scale
        return out

    @classmethod
    def from_tensors(cls, fmt: TensorQuant, shape: tuple[int, int], data: Tensor, scale: Tensor,
                     zero: Tensor | None, act: TensorQuant | None = None,
                     act_scale: Tensor | None = None, super_scale: Tensor | None = None) -> "QuantizedWeight":
        return cls(fmt=fmt, shape=(int(shape[0]), int(shape[1])), data=data, scale=scale.float(), zero=zero,
                   act=act, act_scale=None if act_scale is None else act_scale.float(),
                   super_scale=None if super_scale is None else super_scale.float())

    @staticmethod
    def cat_rows(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack weights of one format along N (fused q/k/v or gate/up: one shared input)."""
        fmt, k, act = parts[0].fmt, parts[0].shape[1], parts[0].act
        if any(p.fmt != fmt or p.shape[1] != k or p.act != act for p in parts) or fmt.granularity == "tensor":
            raise ValueError("only channel- or group-wise weights of one format and width stack")
        act_scale = None
        if parts[0].act_scale is not None:      # one input, so one scale; take the largest to be safe
            act_scale = torch.stack([p.act_scale.reshape(()) for p in parts]).amax().reshape(1)

        def cat(ts: list[Tensor | None]) -> Tensor | None:
            return None if ts[0] is None else torch.cat(ts)
        return QuantizedWeight(fmt, (sum(p.shape[0] for p in parts), k), torch.cat([p.data for p in parts]),
                               torch.cat([p.scale for p in parts]), cat([p.zero for p in parts]), act, act_scale,
                               cat([p.super_scale for p in parts]))


def super_count(groups: int) -> int:
    return -(-groups // SUPER_GROUPS)


def per_group(super_scale: Tensor, groups: int) -> Tensor:
    """Super scales [N, S] -> the super scale of each group [N, G]."""
    return super_scale.repeat_interleave(SUPER_GROUPS, dim=1)[:, :groups]


def super_scales(scale: Tensor, live: Tensor) -> Tensor:
    """Group scales [N, G] -> each super-block's float16 super scale [N, S]: the largest scale of its
    live groups (`live` [N, G]; 1 for a super-block with none)."""
    n, g = scale.shape
    pad = super_count(g) * SUPER_GROUPS - g
    s = torch.nn.functional.pad(torch.where(live, scale, 0.0), (0, pad)).reshape(n, -1, SUPER_GROUPS)
    return _safe(s.amax(dim=-1))


def two_level(scale: Tensor, super_scale: Tensor, live: Tensor) -> Tensor:
    """Group scales [N, G] as two-level scales hold them: the nearest c * (d / 255) for a code c in
    [1, 255] and the group's super scale d (a scale above d is clipped to it); d / 255 for a group
    that is not `live`."""
    step = per_group(scale_steps(super_scale), scale.shape[1])
    c = torch.round(scale / step).clamp(1, 255)
    return torch.where(live, c, 1.0) * step


def scale_codes(scale: Tensor, super_scale: Tensor) -> Tensor:
    """Two-level scales [N, G] (as `two_level` makes them) -> their codes, uint8."""
    return torch.round(scale / per_group(scale_steps(super_scale), scale.shape[1])).clamp(1, 255).to(torch.uint8)


def scale_steps(super_scale: Tensor) -> Tensor:
    """Super scales [N, S] -> the value of one scale code in each super-block, d / 255 (fp32)."""
    return super_scale.float() / 255.0


def decode_scales(codes: Tensor, super_scale: Tensor) -> Tensor:
    """Two-level scale codes [N, G] and super scales [N, S] -> fp32 group scales [N, G]: c * (d / 255)
    (in that order, in fp32: the same value wherever it is computed)."""
    return codes.float() * per_group(scale_steps(super_scale), codes.shape[1])


def params(x: Tensor, fmt: TensorQuant) -> tuple[Tensor, Tensor | None]:
    """Scale (and int4 zero point) of the values along x's last dim -> shapes x.shape[:-1]."""
    return params_from_range(x.amin(dim=-1), x.amax(dim=-1), fmt)


def params_from_range(lo: Tensor, hi: Tensor, fmt: TensorQuant) -> tuple[Tensor, Tensor | None]:
    """Scale (and int4 zero point) that represent the range [lo, hi] (elementwise, lo <= hi):
    symmetric formats cover +-max(|lo|, |hi|) (int4: the larger side in 8 steps, the other in 7, see
    `_int4_params`); asymmetric int4 covers [min(lo, 0), max(hi, 0)]."""
    return fmt.number.params(lo, hi, fmt.symmetric)


def codes(x: Tensor, scale: Tensor, zero: Tensor | None, fmt: TensorQuant) -> Tensor:
    """x quantized with the given (broadcastable) scale / zero: int8 codes, uint4 codes in a uint8,
    or float8 values."""
    return fmt.number.encode(x, scale, zero)


def decode(c: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """The values codes stand for (fp32)."""
    v = c.float()
    return (v - zero.float() if zero is not None else v) * scale


def from_codes(c: Tensor, scale: Tensor, zero: Tensor | None, fmt: TensorQuant,
               name: str = "weight", super_scale: Tensor | None = None) -> QuantizedWeight:
    """Codes [N, K] and per-row/group scale (and zero) [N, G] -> QuantizedWeight; a two-level
    format's scales are codes times `super_scale` [N, S] already (`two_level`)."""
    n, k = c.shape
    if not torch.isfinite(scale).all() or (super_scale is not None and not torch.isfinite(super_scale).all()):
        raise QuantizationError(f"{name}: its values are too large for float16 scales (largest finite scale "
                                f"{torch.finfo(torch.float16).max:g})")
    if fmt.two_level != (super_scale is not None):
        raise ValueError(f"{name}: super scales are given exactly for two-level formats")
    data = fmt.number.pack(c)
    return QuantizedWeight(fmt, (n, k), data, scale.float().reshape(n if fmt.granularity != "tensor" else 1, -1),
                           None if zero is None else zero.to(torch.uint8).reshape(scale.shape),
                           super_scale=None if super_scale is None else super_scale.float())


def live_groups(c: Tensor, zero: Tensor) -> Tensor:
    """Groups [..., G, gs] of codes with zero points [..., G] -> whether each has a code other than its
    zero point (a value that decodes to something other than 0)."""
    return (c != zero[..., None].to(c.dtype)).any(dim=-1)


def quantize(w: Tensor, fmt: TensorQuant, name: str = "weight", observer=None,
             importance: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of one weight [N, K] in format `fmt`; the scales cover each
    row's or group's min/max, or the range `observer` (llmc.passes.quant.observers) chooses, which
    may weigh each input column's error by `importance` [K]. Two-level scales: the scales found so,
    rounded to two levels (`two_level`), and the codes found again against them."""
    if w.dim() != 2:
        raise QuantizationError(f"{name}: only 2-D weights are quantized, got shape {tuple(w.shape)}")
    w = w.float()
    _check_finite(w, name)
    n, k = w.shape
    if fmt.granularity == "token":
        raise QuantizationError("per-token granularity is for activations, not weights")
    imp = None
    if fmt.granularity == "group":
        x = grouped(w, fmt.group_size)                                    # [N, G, gs]
        imp = None if importance is None else grouped(importance.float()[None], fmt.group_size)
    elif fmt.granularity == "channel":
        x = w[:, None, :]                                                  # [N, 1, K]
        imp = None if importance is None else importance.float()[None, None]
    else:
        x = w.reshape(1, 1, -1)                                            # [1, 1, N*K]
        imp = None if importance is None else importance.float().repeat(n)[None, None]
    if observer is None:
        scale, zero = params(x, fmt)                                       # [N, G]
    else:
        scale, zero = observer.params(x, fmt, imp)
    c = codes(x, scale[..., None], None if zero is None else zero[..., None], fmt)
    super_scale = None
    if fmt.two_level:
        live = live_groups(c, zero)
        super_scale = super_scales(scale, live)
        scale = two_level(scale, super_scale, live)
        c = torch.where(live[..., None], codes(x, scale[..., None], zero[..., None], fmt), c)
    return from_codes(_restore(c, fmt, n, k), scale, zero, fmt, name, super_scale)


def _restore(q: Tensor, fmt: TensorQuant, n: int, k: int) -> Tensor:
    return ungrouped(q, k) if fmt.granularity == "group" else q.reshape(n, k)
