"""CPU kernels for quantized weights against the reference (dequantize, then matmul)."""
from __future__ import annotations

import pytest
import torch

from llmc.kernels import KernelContext, kernel_for
from llmc.passes.quant.sensitivity import format_label
from llmc.quantized.formats import TensorQuant, quantize
from tests.helpers import fast_kernel_sets

FORMATS = [TensorQuant(dtype="int8", granularity="channel"),
           TensorQuant(dtype="int4", granularity="group", group_size=32),
           TensorQuant(dtype="int4", granularity="group", group_size=128, symmetric=False),
           TensorQuant(dtype="int4", granularity="group", group_size=48),      # pieces of 32 + a 16 tail
           TensorQuant(dtype="int4", granularity="group", group_size=7, symmetric=False),   # odd: value by value
           # two-level scales: decoded to fp32 group scales where they are read, then the same kernels
           TensorQuant(dtype="int4", granularity="group", group_size=32, scale_bits=8),
           TensorQuant(dtype="int4", granularity="group", group_size=16, symmetric=False, scale_bits=8)]


def call(op, impl, values, weights):
    k = kernel_for(op, impl)
    w = k.prepare(tuple(weights), {}) if k.prepare else tuple(weights)
    out = k.fn(KernelContext(), *values, *w)
    return out if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("impl", fast_kernel_sets())
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: format_label(f))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 40])       # 9 and 40 rows take the prefill path
@pytest.mark.parametrize("k", [64, 172, 301])                    # partial groups; odd widths
def test_linear(impl, fmt, m, k):
    g = torch.Generator().manual_seed(m + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(48, k, generator=g), torch.randn(48, generator=g)
    qw = quantize(w, fmt)
    for bias in ([], [b]):
        ref, = call("linear", "reference", [x], [qw] + bias)
        cpu, = call("linear", impl, [x], [qw] + bias)
        torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-4)   # fp32 sums of k terms, other order


@pytest.mark.parametrize("impl", fast_kernel_sets())
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: format_label(f))
def test_fused_linears(impl, fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, generator=g)
    ws = [quantize(torch.randn(n, 96, generator=g), fmt) for n in (64, 32, 32)]
    for op, weights in (("qkv_linear", ws), ("gate_up_silu", ws[1:])):
        for a, b in zip(call(op, "reference", [x], weights), call(op, impl, [x], weights)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.dtype == "int4"], ids=lambda f: format_label(f))
@pytest.mark.parametrize("k", [64, 172, 301])
def test_native_int4_dequantize_is_exact(fmt, k):
    """The prefill path's native dequantize computes (u - z) * s like the reference: bit for bit."""
    from llmc.kernels.cpu import native
    from llmc.kernels.reference.dequant import dequantize
    if native.library() is None:
        pytest.skip(f"native CPU kernels unavailable: {native.status()['error']}")
    qw = quantize(torch.randn(37, k, generator=torch.Generator().manual_seed(k)), fmt)
    assert torch.equal(native.dequantize_int4(qw.data, qw.scale, qw.zero, k, fmt.group_size), dequantize(qw))
