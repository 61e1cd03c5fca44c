"""Rotary position embedding (the rotate-half layout of kernels/reference/rope.py) in Triton.

The angles are the reference's own: inverse frequencies from `rope_inv_freq` (every rope type it
supports: default, linear, llama3) and the cos / sin table [T, head_dim] from `rope_cos_sin`, made
host-side once per step and shared by every layer (the caller keeps it in the step's scratch). The
kernel does the rotation: per token, every head of q or k in one program,
    out[:half] = x[:half] * cos - x[half:] * sin,   out[half:] = x[half:] * cos + x[:half] * sin
(cos and sin repeat each frequency for both halves, so their first half is all the kernel reads)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels.reference.rope import rope_cos_sin, rope_inv_freq
from llmc.kernels.triton.lazy import check_device


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, half, x_stride, y_stride, cs_stride,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)                                   # one program per token: all its heads
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < heads) & (j < half)
    cos = tl.load(cos_ptr + t * cs_stride + j, mask=j < half, other=0.0)
    sin = tl.load(sin_ptr + t * cs_stride + j, mask=j < half, other=0.0)
    lo_ptr = x_ptr + t * x_stride + h * (2 * half) + j
    lo = tl.load(lo_ptr, mask=mask, other=0.0)
    hi = tl.load(lo_ptr + half, mask=mask, other=0.0)
    cos, sin = cos.to(lo.dtype).to(tl.float32), sin.to(lo.dtype).to(tl.float32)   # the reference's rounding
    lo, hi = lo.to(tl.float32), hi.to(tl.float32)
    out = y_ptr + t * y_stride + h * (2 * half) + j
    tl.store(out, (lo * cos - hi * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, (hi * cos + lo * sin).to(y_ptr.dtype.element_ty), mask=mask)


_INV_FREQ: dict = {}


def cos_sin(positions: Tensor, head_dim: int, params: dict) -> tuple[Tensor, Tensor]:
    """The reference's cos, sin [T, head_dim] (fp32) for `positions`, on their device."""
    key = (head_dim, tuple(sorted(params.items())), positions.device)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = rope_inv_freq(head_dim, **params).to(positions.device)
    cos, sin = rope_cos_sin(positions, _INV_FREQ[key])
    return cos.contiguous(), sin.contiguous()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    """x [T, heads * head_dim] rotated per head with cos / sin [T, head_dim]."""
    check_device(x, cos)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, width = x.shape
    heads, half = width // head_dim, head_dim // 2
    y = torch.empty((t, width), dtype=x.dtype, device=x.device)
    if t:
        _rope_kernel[(t,)](x, cos, sin, y, heads, half, x.stride(0), y.stride(0), cos.stride(0),
                           BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(half))
    return y
