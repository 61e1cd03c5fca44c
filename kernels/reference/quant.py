"""Reference activation quantization: what a quantized linear does to its input at run time."""
from __future__ import annotations

import torch
from torch import Tensor

FP8_MAX = 448.0


def quant_int8_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, H] float -> q [T, H] int8, scale [T, 1] fp32. Symmetric absmax per token; rounds half
    to even; an all-zero row gets scale 1."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def fake_quant_int8_rowwise(x: Tensor) -> Tensor:
    q, scale = quant_int8_rowwise(x)
    return (q.float() * scale).to(x.dtype)


def fake_quant_fp8_tensor(x: Tensor, scale: Tensor) -> Tensor:
    """x through fp8 e4m3 with a static per-tensor scale (saturating at +-448)."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def quantize_input(x: Tensor, act, act_scale: Tensor | None) -> Tensor:
    """The values a quantized linear really multiplies: x in the weight's activation format."""
    if act.dtype == "int8" and act.granularity == "token":
        return fake_quant_int8_rowwise(x)
    if act.dtype == "fp8_e4m3" and act.granularity == "tensor":
        return fake_quant_fp8_tensor(x, act_scale)
    raise ValueError(f"no reference for activations in {act.key}")
