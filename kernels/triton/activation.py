"""SwiGLU's activation in Triton: silu(gate) * up, elementwise. The inputs may be strided views (the
two halves of the fused gate/up matmul's output, which `gate_up_silu` passes without a copy).
Same rounding as the reference `F.silu(gate) * up`: silu in fp32, rounded to the input dtype, then
the product."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels.triton.lazy import check_device

BLOCK = 1024                              # features per program


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, width, g_stride, u_stride, y_stride, BLOCK: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, (silu * u).to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [T, F] (rows may be strided, features contiguous) -> silu(gate) * up [T, F]."""
    check_device(gate, up)
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    up = up if up.stride(-1) == 1 else up.contiguous()
    t, width = gate.shape
    y = torch.empty((t, width), dtype=gate.dtype, device=gate.device)
    block = min(BLOCK, triton.next_power_of_2(width))
    if t:
        _silu_mul_kernel[(t, triton.cdiv(width, block))](gate, up, y, width, gate.stride(0), up.stride(0),
                                                         y.stride(0), BLOCK=block)
    return y
