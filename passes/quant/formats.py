"""Number formats: quantize / dequantize primitives for weights, and `QuantizedWeight`, the typed
value a quantized weight is (packed data, scales, zero points, format) that serializes to plain
safetensors tensors.

Conventions (every format, exact):
- weights are [N, K] (out features, in features); scales run along N (channel) or along N and
  groups of K (group: G = ceil(K / group_size), the last group may be partial).
- rounding is round-half-to-even (`torch.round`).
- int8: symmetric, q in [-127, 127], scale = absmax / 127.
- int4: stored unsigned u in [0, 15] with a zero point z; w ~ (u - z) * scale.
  symmetric: z = 8, scale = absmax / 7;  asymmetric: scale = (max - min) / 15 over [min(w, 0),
  max(w, 0)], z = round(-min / scale). Packed two per byte, low nibble first.
- fp8_e4m3: scale = absmax / 448, q = clamp(w / scale, +-448) cast to float8_e4m3fn (saturating).
- an all-zero row or group gets scale 1 (so q = 0 and the dequantized value is exactly 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.errors import LlmcError
from llmc.passes.quant.scheme import TensorQuant

FP8_MAX = 448.0


class QuantizationError(LlmcError):
    """A tensor cannot be quantized (NaN/Inf values, an unsupported shape)."""


def _check_finite(w: Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{name}: has NaN or Inf values; refusing to quantize it")


def _safe(scale: Tensor) -> Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def group_count(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """[N, K] -> [N, G, group_size], the partial last group padded with zeros (which never change
    a group's absmax, min(., 0) or max(., 0))."""
    n, k = w.shape
    g = group_count(k, group_size)
    pad = g * group_size - k
    return torch.nn.functional.pad(w, (0, pad)).reshape(n, g, group_size)


def _ungrouped(x: Tensor, k: int) -> Tensor:
    return x.reshape(x.shape[0], -1)[:, :k]


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


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    fmt: TensorQuant
    shape: tuple[int, int]              # logical [N, K]
    data: Tensor                        # int8 [N, K] | uint8 packed [N, ceil(K/2)] | float8 [N, K]
    scale: Tensor                       # fp32 [N, 1] (channel), [N, G] (group) or [1, 1] (tensor)
    zero: Tensor | None = None          # uint8 [N, G] zero points (int4 only)
    act: TensorQuant | None = None      # how the input is quantized at run time (None: it is not)
    act_scale: Tensor | None = None     # fp32 [1] static per-tensor input scale (calibrated)

    SUFFIXES = ("qdata", "scale", "zero", "act_scale")

    @property
    def kernel_key(self) -> str:
        """The kernel registry key: weight format, and the input's format when it is quantized."""
        return self.fmt.key if self.act is None else f"{self.fmt.key}+{self.act.key}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero, self.act_scale)
                   if t is not None)

    def tensors(self, name: str) -> dict[str, Tensor]:
        out = {f"{name}.qdata": self.data, f"{name}.scale": self.scale}
        if self.zero is not None:
            out[f"{name}.zero"] = self.zero
        if self.act_scale is not None:
            out[f"{name}.act_scale"] = self.act_scale
        return out

    @classmethod
    def from_tensors(cls, fmt: TensorQuant, shape: tuple[int, int], data: Tensor, scale: Tensor,
                     zero: Tensor | None, act: TensorQuant | None = None,
                     act_scale: Tensor | None = None) -> "QuantizedWeight":
        return cls(fmt=fmt, shape=(int(shape[0]), int(shape[1])), data=data, scale=scale.float(), zero=zero,
                   act=act, act_scale=None if act_scale is None else act_scale.float())

    @staticmethod
    def cat_rows(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack weights of one format along N (fused q/k/v or gate/up: one shared input)."""
        fmt, k, act = parts[0].fmt, parts[0].shape[1], parts[0].act
        if any(p.fmt != fmt or p.shape[1] != k or p.act != act for p in parts) or fmt.granularity == "tensor":
            raise ValueError("only channel- or group-wise weights of one format and width stack")
        act_scale = None
        if parts[0].act_scale is not None:      # one input, so one scale; take the largest to be safe
            act_scale = torch.stack([p.act_scale.reshape(()) for p in parts]).amax().reshape(1)
        zero = torch.cat([p.zero for p in parts]) if parts[0].zero is not None else None
        return QuantizedWeight(fmt, (sum(p.shape[0] for p in parts), k), torch.cat([p.data for p in parts]),
                               torch.cat([p.scale for p in parts]), zero, act, act_scale)


def params(x: Tensor, fmt: TensorQuant) -> tuple[Tensor, Tensor | None]:
    """Scale (and int4 zero point) of the values along x's last dim -> shapes x.shape[:-1]."""
    return params_from_range(x.amin(dim=-1), x.amax(dim=-1), fmt)


def params_from_range(lo: Tensor, hi: Tensor, fmt: TensorQuant) -> tuple[Tensor, Tensor | None]:
    """Scale (and int4 zero point) that represent the range [lo, hi] (elementwise, lo <= hi):
    symmetric formats cover +-max(|lo|, |hi|); asymmetric int4 covers [min(lo, 0), max(hi, 0)]."""
    absmax = torch.maximum(lo.abs(), hi.abs())
    if fmt.dtype == "int8":
        return _safe(absmax / 127.0), None
    if fmt.dtype == "fp8_e4m3":
        return _safe(absmax / FP8_MAX), None
    if fmt.symmetric:
        scale = _safe(absmax / 7.0)
        return scale, torch.full_like(scale, 8.0)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = _safe((hi - lo) / 15.0)
    return scale, torch.round(-lo / scale).clamp(0, 15)


def codes(x: Tensor, scale: Tensor, zero: Tensor | None, fmt: TensorQuant) -> Tensor:
    """x quantized with the given (broadcastable) scale / zero: int8 codes, uint4 codes in a uint8,
    or float8 values."""
    if fmt.dtype == "int8":
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    if fmt.dtype == "fp8_e4m3":
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (torch.round(x / scale) + zero).clamp(0, 15).to(torch.uint8)


def decode(c: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """The values codes stand for (fp32)."""
    v = c.float()
    return (v - zero.float() if zero is not None else v) * scale


def from_codes(c: Tensor, scale: Tensor, zero: Tensor | None, fmt: TensorQuant) -> QuantizedWeight:
    """Codes [N, K] and per-row/group scale (and zero) [N, G] -> QuantizedWeight."""
    n, k = c.shape
    data = pack_int4(c) if fmt.dtype == "int4" else c
    return QuantizedWeight(fmt, (n, k), data, scale.float().reshape(n if fmt.granularity != "tensor" else 1, -1),
                           None if zero is None else zero.to(torch.uint8).reshape(scale.shape))


def quantize(w: Tensor, fmt: TensorQuant, name: str = "weight", observer=None) -> QuantizedWeight:
    """Round-to-nearest quantization of one weight [N, K] in format `fmt`; the scales cover each
    row's or group's min/max, or the range `observer` (llmc.passes.quant.observers) chooses."""
    if w.dim() != 2:
        raise QuantizationError(f"{name}: only 2-D weights are quantized, got shape {tuple(w.shape)}")
    w = w.float()
    _check_finite(w, name)
    n, k = w.shape
    if fmt.granularity == "token":
        raise QuantizationError("per-token granularity is for activations, not weights")
    if fmt.granularity == "group":
        x = _grouped(w, fmt.group_size)                                    # [N, G, gs]
    elif fmt.granularity == "channel":
        x = w[:, None, :]                                                  # [N, 1, K]
    else:
        x = w.reshape(1, 1, -1)                                            # [1, 1, N*K]
    scale, zero = (params if observer is None else observer.params)(x, fmt)   # [N, G]
    c = codes(x, scale[..., None], None if zero is None else zero[..., None], fmt)
    return from_codes(_restore(c, fmt, n, k), scale, zero, fmt)


def _restore(q: Tensor, fmt: TensorQuant, n: int, k: int) -> Tensor:
    return _ungrouped(q, k) if fmt.granularity == "group" else q.reshape(n, k)


def dequantize(qw: QuantizedWeight) -> Tensor:
    """QuantizedWeight -> fp32 [N, K]."""
    n, k = qw.shape
    fmt = qw.fmt
    if fmt.dtype == "int4":
        vals = unpack_int4(qw.data, k).float()
    else:
        vals = qw.data.float()
    if fmt.granularity == "group":
        g = _grouped(vals, fmt.group_size)
        if qw.zero is not None:
            g = g - qw.zero.float()[..., None]
        return _ungrouped(g * qw.scale[..., None], k)
    if qw.zero is not None:
        vals = vals - qw.zero.float()
    return vals * qw.scale if fmt.granularity == "channel" else vals * qw.scale.reshape(())
