"""Activation quantization (w8a8, fp8): reference primitives, SmoothQuant on outliers, CPU parity."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmc.kernels import KernelContext, kernel_for
from llmc.kernels.reference.quant import fake_quant_fp8_tensor, quant_int8_rowwise
from llmc.kernels.reference.dequant import dequantize
from llmc.quantized.formats import quantize
from llmc.quantized.scheme import FP8, W8A8
from tests.helpers import fast_kernel_sets
from tests.tolerances import sqnr_db


def test_int8_rowwise_exact():
    x = torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0]])
    q, s = quant_int8_rowwise(x)
    assert q.tolist() == [[127, -64, 0], [0, 0, 0]] and s.flatten().tolist() == pytest.approx([0.01, 1.0])


def test_fp8_static_saturates():
    y = fake_quant_fp8_tensor(torch.tensor([1.0, 1000.0, -3.0]), torch.tensor([1.0]))
    assert y.tolist() == [1.0, 448.0, -3.0]


def w8a8_out(x, w):
    qw = replace(quantize(w, W8A8.weight), act=W8A8.activation)
    k = kernel_for("linear", "reference")
    return k.fn(KernelContext(), x, qw)


def test_smoothquant_raises_w8a8_sqnr_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17, 40]] *= 50                                       # a few outlier channels
    w = torch.randn(32, 64, generator=g) * 0.1
    ref = x @ w.T
    plain = sqnr_db(ref, w8a8_out(x, w))
    alpha = 0.5
    s = x.abs().amax(0).pow(alpha) / w.abs().amax(0).pow(1 - alpha)
    smoothed = sqnr_db(ref, w8a8_out(x / s, w * s))
    assert smoothed > plain + 6, (plain, smoothed)


@pytest.mark.parametrize("impl", fast_kernel_sets())
@pytest.mark.parametrize("scheme", [W8A8, FP8], ids=["w8a8", "fp8"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fast_kernels_match_reference(impl, scheme, m):
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 96, generator=g), torch.randn(40, 96, generator=g)
    qw = replace(quantize(w, scheme.weight), act=scheme.activation,
                 act_scale=torch.tensor([4.0 / 448]) if scheme is FP8 else None)
    ref = kernel_for("linear", "reference").fn(KernelContext(), x, qw)
    cpu = kernel_for("linear", impl).fn(KernelContext(), x, qw)
    torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-4)
    assert sqnr_db(x @ dequantize(qw).T, ref) > 15                 # the input really is quantized, not skipped
