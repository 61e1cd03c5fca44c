"""Reference activation quantization: what a quantized linear does to its input at run time."""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


def quant_int8_groupwise(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """x [..., K] float -> q [..., K] int8, scale [..., G] fp32: symmetric absmax over each group of
    `group_size` consecutive features of a row (the last group may be shorter); rounds half to even;
    an all-zero group gets scale 1. The activations of w4a8 (llama.cpp's Q8_0 blocks)."""
    k = x.shape[-1]
    g = -(-k // group_size)
    xf = F.pad(x.float(), (0, g * group_size - k)).reshape(*x.shape[:-1], g, group_size)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
    return q.reshape(*x.shape[:-1], g * group_size)[..., :k], scale.squeeze(-1)


def fake_quant_int8_groupwise(x: Tensor, group_size: int) -> Tensor:
    q, scale = quant_int8_groupwise(x, group_size)
    k = x.shape[-1]
    g = scale.shape[-1]
    qf = F.pad(q.float(), (0, g * group_size - k)).reshape(*x.shape[:-1], g, group_size)
    return (qf * scale.unsqueeze(-1)).reshape(*x.shape[:-1], g * group_size)[..., :k].to(x.dtype)


def fake_quant_fp8_tensor(x: Tensor, scale: Tensor) -> Tensor:
    """x through fp8 e4m3 with a static per-tensor scale (saturating at +-448)."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def quantize_input(x: Tensor, act, act_scale: Tensor | None) -> Tensor:
    """The values a quantized linear really multiplies: x in the weight's activation format."""
    if act.dtype == "int8" and act.granularity == "token":
        return fake_quant_int8_rowwise(x)
    if act.dtype == "int8" and act.granularity == "group":
        return fake_quant_int8_groupwise(x, act.group_size)
    if act.dtype == "fp8_e4m3" and act.granularity == "tensor":
        return fake_quant_fp8_tensor(x, act_scale)
    raise ValueError(f"no reference for activations in {act.key}")
