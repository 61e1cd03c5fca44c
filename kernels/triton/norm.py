"""Fused RMSNorm kernels: `rms_norm` and `add_rms_norm` (the residual add, its store and the norm in
one pass), over consecutive groups of `group` features (group == width: the usual RMSNorm; smaller:
per attention head, qwen3's q/k norm). Same arithmetic as kernels/reference/dense.py: the mean
square in fp32, the normalised value rounded to the input dtype, then times the weight."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels.triton.lazy import check_device


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, group, eps, x_stride, r_stride, y_stride, h_stride,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)            # one program per (token, group of features)
    cols = tl.arange(0, BLOCK)
    mask = cols < group                                    # BLOCK = next pow2 >= group
    offs = g * group + cols
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
    if ADD:                                                # h = x + r, in the input dtype, stored too
        x = x + tl.load(r_ptr + row * r_stride + offs, mask=mask, other=0.0)
        tl.store(h_ptr + row * h_stride + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / group + eps)
    y = (xf * inv_rms).to(x.dtype).to(tl.float32)          # rounded to the input dtype, as the reference
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + offs, (w * y).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float, group: int) -> Tensor:
    """x [T, F] -> [T, F]: each group of `group` features over its root mean square, times weight [group]."""
    return _launch(_rows(x), None, weight, eps, group)[0]


def add_rms_norm(x: Tensor, r: Tensor, weight: Tensor, eps: float, group: int) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + r), x + r)."""
    return _launch(_rows(x), _rows(r), weight, eps, group)


def _launch(x: Tensor, r: Tensor | None, weight: Tensor, eps: float, group: int) -> tuple[Tensor, Tensor | None]:
    check_device(x, r, weight)
    t, width = x.shape
    if width % group:
        raise ValueError(f"width {width} is not a multiple of the norm group {group}")
    y = torch.empty((t, width), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if r is not None else None
    if t:
        _rms_norm_kernel[(t, width // group)](
            x, r if r is not None else x, weight.contiguous(), y, h if h is not None else y, group, float(eps),
            x.stride(0), (r if r is not None else x).stride(0), y.stride(0), y.stride(0),
            ADD=r is not None, BLOCK=triton.next_power_of_2(group))
    return y, h
