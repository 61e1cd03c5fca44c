"""Reference kernels for the dense ops: the specification every fast kernel is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmc.kernels.reference.dequant import dequantize_rows
from llmc.quantized.formats import QuantizedWeight


def embed(tokens: Tensor, table) -> Tensor:
    """tokens [T] int -> rows of table [V, H] -> [T, H]; a quantized table's rows decoded to fp32."""
    if isinstance(table, QuantizedWeight):
        return dequantize_rows(table, tokens)
    return table[tokens]


def rms_norm(x: Tensor, weight: Tensor, eps: float, group: int) -> Tensor:
    """x [T, F]: each consecutive group of `group` features is divided by its root mean square
    (computed in fp32), then scaled by weight [group]. group == F is the usual RMSNorm; a smaller
    group normalises each attention head on its own (qwen3's q/k norm)."""
    t, width = x.shape
    xf = x.float().reshape(t, width // group, group)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * y.to(x.dtype)).reshape(t, width)


def linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """x [T, K] @ weight[N, K].T (+ bias [N]) -> [T, N]. A quantized weight means its dequantized
    values (passes/quant/formats.py)."""
    from llmc.kernels.reference.quant import quantize_input
    from llmc.kernels.reference.dequant import dequantize
    from llmc.quantized.formats import QuantizedWeight
    if isinstance(weight, QuantizedWeight):
        if weight.act is not None:
            x = quantize_input(x, weight.act, weight.act_scale)
        weight = dequantize(weight).to(x.dtype)
    y = x @ weight.t()
    return y if bias is None else y + bias


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def add(a: Tensor, b: Tensor) -> Tensor:
    return a + b
