"""Linear layers in Triton: x [M, K] @ W[N, K].T (+ bias [N]) for float weights and for packed
QuantizedWeights (llmc/quantized/formats.py), dequantized inside the kernel tile by tile:

- int8 per channel (or per tensor): code * scale;
- int4 group-wise, symmetric or asymmetric, two codes a byte (low nibble first), a partial last group
  allowed: (code - zero) * scale of the code's group;
- fp8 e4m3 per channel (or per tensor): the bytes decoded arithmetically (kernels/triton/formats.py),
  times the scale.

The decoded tile is rounded to x's dtype and multiplied in fp32, which is what the reference does
(dequantize, cast, matmul). Two kernels: few rows (decode, up to GEMV_MAX_ROWS: one program per row
and block of outputs, a streaming dot product; no tensor cores, no tile of wasted rows) and many rows
(a tiled GEMM on tl.dot, fp32 inputs at IEEE precision rather than TF32, to match the reference).

Weights whose inputs are quantized at run time (w8a8: int8 per token; w4a8: int8 per group; fp8: e4m3
with a static per-tensor scale) put x through the reference's fake quantization host-side
(kernels/reference/quant.py, plain torch on x's device), then run the weight kernel above: the values
multiplied are the reference's, the integer-product speedup of a true int8 GEMM is not sought here.
The two axes are two registries: the weight's format (`WEIGHT_FORMATS`, the in-kernel decoder) and
the input's (`ACTIVATIONS`); any registered pair runs.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.errors import ConfigError
from llmc.kernels.reference.quant import fake_quant_fp8_tensor, fake_quant_int8_groupwise, fake_quant_int8_rowwise
from llmc.kernels.triton.formats import e4m3_to_float
from llmc.kernels.triton.lazy import check_device
from llmc.quantized.formats import QuantizedWeight
from llmc.registry import Registry

GEMV_MAX_ROWS = 4                          # at most this many rows: the GEMV kernel; more: the GEMM
GEMV_BLOCK_N, GEMV_BLOCK_K = 128, 64
GEMM_BLOCK_N, GEMM_BLOCK_K = 64, 32
NUM_WARPS = 8                              # with these tiles: (next to) no register spills (ptxas, sm_80)

WEIGHT_FORMATS: Registry[str] = Registry("triton weight format")   # TensorQuant.key -> in-kernel decoder
for _key, _decoder in (("int8/channel", "int8"), ("int8/tensor", "int8"), ("int4/group", "int4"),
                       ("int4/group-asym", "int4"), ("fp8_e4m3/channel", "fp8"), ("fp8_e4m3/tensor", "fp8")):
    WEIGHT_FORMATS.add(_key, _decoder)

ACTIVATIONS: Registry[Callable[[Tensor, QuantizedWeight], Tensor]] = Registry("triton activation format")
ACTIVATIONS.add("int8/token", lambda x, qw: fake_quant_int8_rowwise(x))
ACTIVATIONS.add("int8/group", lambda x, qw: fake_quant_int8_groupwise(x, qw.act.group_size))
ACTIVATIONS.add("fp8_e4m3/tensor", lambda x, qw: fake_quant_fp8_tensor(x, qw.act_scale))


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, n, k, mask, w_stride, s_stride, FMT: tl.constexpr, GROUP: tl.constexpr):
    """fp32 values of the weight at rows n, columns k (index tensors that broadcast); 0 where masked."""
    if FMT == "int4":
        byte = tl.load(w_ptr + n * w_stride + k // 2, mask=mask, other=0).to(tl.int32)
        code = ((byte >> ((k % 2) * 4)) & 0xF).to(tl.float32)
        g = n * s_stride + k // GROUP
        zero = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
        w = (code - zero) * tl.load(s_ptr + g, mask=mask, other=0.0)
    elif FMT == "int8":
        w = tl.load(w_ptr + n * w_stride + k, mask=mask, other=0).to(tl.float32)
        w = w * tl.load(s_ptr + n * s_stride, mask=mask, other=0.0)
    elif FMT == "fp8":
        w = e4m3_to_float(tl.load(w_ptr + n * w_stride + k, mask=mask, other=0))
        w = w * tl.load(s_ptr + n * s_stride, mask=mask, other=0.0)
    else:
        w = tl.load(w_ptr + n * w_stride + k, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, x_stride, w_stride, s_stride, y_stride,
                 FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row, pid_n = tl.program_id(0), tl.program_id(1)       # one row, BLOCK_N outputs
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * x_stride + k, mask=k < K, other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, rn[:, None], k[None, :], (rn[:, None] < N) & (k[None, :] < K),
                         w_stride, s_stride, FMT, GROUP)
        acc += tl.sum(w.to(x.dtype).to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    y = acc.to(y_ptr.dtype.element_ty)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0)
    tl.store(y_ptr + row * y_stride + rn, y, mask=rn < N)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, x_stride, w_stride, s_stride, y_stride,
                 FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)     # one BLOCK_M x BLOCK_N tile of the output
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * x_stride + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K),
                    other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, rn[None, :], k[:, None], (k[:, None] < K) & (rn[None, :] < N),
                         w_stride, s_stride, FMT, GROUP)                                   # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    y = acc.to(y_ptr.dtype.element_ty)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * y_stride + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: IEEE for fp32 inputs (triton's default there is TF32, 10 mantissa
    bits: not the reference's numbers); 16-bit inputs are multiplied exactly either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _operands(weight) -> tuple[str, Tensor, Tensor | None, Tensor | None, int, int]:
    """(decoder, data, scale, zero, scale row stride, group size) of a float or quantized weight."""
    if not isinstance(weight, QuantizedWeight):
        return "float", weight.contiguous(), None, None, 0, 1
    decoder = WEIGHT_FORMATS.get(weight.fmt.key)
    if decoder is None:
        raise ConfigError(f"no triton kernel for weights in format {weight.fmt.key}",
                          hint=f"the triton kernels read {', '.join(WEIGHT_FORMATS)}")
    data = weight.data.view(torch.uint8) if decoder == "fp8" else weight.data
    per_row = weight.fmt.granularity != "tensor"
    return (decoder, data, weight.scale, weight.zero, weight.scale.stride(0) if per_row else 0,
            weight.fmt.group_size or 1)


def quantize_input(x: Tensor, weight) -> Tensor:
    """x as the weight's kernel multiplies it: through its activation format when it has one."""
    if not isinstance(weight, QuantizedWeight) or weight.act is None:
        return x
    fake_quant = ACTIVATIONS.get(weight.act.key)
    if fake_quant is None:
        raise ConfigError(f"no triton kernel for inputs quantized as {weight.act.key}",
                          hint=f"the triton kernels quantize inputs as {', '.join(ACTIVATIONS)}")
    return fake_quant(x, weight)


def linear(x: Tensor, weight, bias: Tensor | None = None) -> tuple[Tensor, str]:
    """x [M, K] @ weight.T (+ bias) -> ([M, N] in x's dtype, the kernel variant that ran)."""
    decoder, data, scale, zero, s_stride, group = _operands(weight)
    x = quantize_input(x, weight)
    check_device(x, data, bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (scale if scale is not None else data, zero if zero is not None else data,
            bias.contiguous() if bias is not None else y, y)
    common = dict(FMT=decoder, GROUP=group, HAS_BIAS=bias is not None)
    if m <= GEMV_MAX_ROWS:
        if m:
            _gemv_kernel[(m, triton.cdiv(n, GEMV_BLOCK_N))](
                x, data, *args, n, k, x.stride(0), data.stride(0), s_stride, y.stride(0), **common,
                BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K, num_warps=NUM_WARPS)
        return y, f"triton GEMV ({decoder})"
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, GEMM_BLOCK_N))](
        x, data, *args, m, n, k, x.stride(0), data.stride(0), s_stride, y.stride(0), **common,
        PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_N=GEMM_BLOCK_N, BLOCK_K=GEMM_BLOCK_K,
        num_warps=NUM_WARPS)
    return y, f"triton GEMM ({decoder})"
