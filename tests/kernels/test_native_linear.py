"""gemm.c's llmc_linear_weight, the linear of the native executor, on every weight kind it reads:
against the reference (dequantize, then the inputs through their activation format, then a float64
matmul) at stated tolerances, on shapes with remainders in every tiled dimension, and row by row
bit-identical whatever the number of rows (the tiles never change a row's summation order)."""
from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch

from llmc.backends.native import FLOAT_KINDS, LAYOUT_PACKED, Weight, quantized_weight, tiled
from llmc.kernels.cpu import native
from llmc.kernels.reference.dequant import dequantize
from llmc.kernels.reference.quant import quantize_input
from llmc.quantized.formats import TensorQuant, quantize

INT4 = dict(dtype="int4", granularity="group")
KINDS = {   # name -> (weight format or float dtype, input format)
    "fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None),
    "int8": (TensorQuant(dtype="int8"), None),
    "int4-g32": (TensorQuant(**INT4, group_size=32), None),
    "int4-g48-asym": (TensorQuant(**INT4, group_size=48, symmetric=False), None),
    "w8a8": (TensorQuant(dtype="int8"), TensorQuant(dtype="int8", granularity="token")),
    "w4a8-g32": (TensorQuant(**INT4, group_size=32), TensorQuant(dtype="int8", granularity="group", group_size=32)),
    "w4a8-g48-asym": (TensorQuant(**INT4, group_size=48, symmetric=False),
                      TensorQuant(dtype="int8", granularity="group", group_size=48)),
    "int4-g64-asym": (TensorQuant(**INT4, group_size=64, symmetric=False), None),
    "w4a8-g64-asym": (TensorQuant(**INT4, group_size=64, symmetric=False),
                      TensorQuant(dtype="int8", granularity="group", group_size=64)),
    "fp8": (TensorQuant(dtype="fp8_e4m3", granularity="channel"), TensorQuant(dtype="fp8_e4m3", granularity="tensor")),
    # two-level scales: the panels keep 8-bit codes and a step per 8 groups instead of fp32 scales
    "int4-g16-asym-s8": (TensorQuant(**INT4, group_size=16, symmetric=False, scale_bits=8), None),
    "w4a8-g32-s8": (TensorQuant(**INT4, group_size=32, scale_bits=8),
                    TensorQuant(dtype="int8", granularity="group", group_size=32)),
}
ACT_SCALE = torch.tensor([0.01])        # fp8 inputs' static scale: inputs up to |4| use codes up to 400 of 448


def _weight(kind: str, w: torch.Tensor, bias: torch.Tensor | None):
    """(the kernel's Weight, the tensors it points into, the reference's float weight and input format)."""
    fmt, act = KINDS[kind]
    b = bias.contiguous() if bias is not None else None
    bp = b.data_ptr() if b is not None else None
    if isinstance(fmt, torch.dtype):
        t = w.to(fmt).contiguous()
        return Weight(FLOAT_KINDS[fmt], *w.shape, 0, t.data_ptr(), None, None, bp), [t, b], t.double(), None
    qw = quantize(w, fmt, "w")
    if act is not None:
        qw = dataclasses.replace(qw, act=act, act_scale=ACT_SCALE if fmt.dtype == "fp8_e4m3" else None)
    keep = [b]

    def tensor(t: torch.Tensor) -> int:
        keep.append(t.contiguous())
        return keep[-1].data_ptr()
    return quantized_weight(qw, tensor, bp), keep, dequantize(qw).double(), act


def _run(weight: Weight, x: torch.Tensor, threads: int = 2) -> torch.Tensor:
    y = torch.empty(x.shape[0], weight.n)
    native.library().llmc_linear_weight(ctypes.byref(weight), x.data_ptr(), y.data_ptr(), x.shape[0], threads)
    return y


TILED = ["fp32", "bf16", "fp16", "int8", "fp8", "int4-g32", "int4-g48-asym", "int4-g64-asym", "w4a8-g32", "w4a8-g48-asym",
         "w4a8-g64-asym", "w8a8", "int4-g16-asym-s8", "w4a8-g32-s8"]


def tileable(kind: str, k: int) -> bool:
    """w8a8 tiles hold pieces of 32 values; w4a8 panels 8 values of k at a time (whole ones, in whole
    groups); weight-only int4 panels a byte per pair of k (even k and group)."""
    fmt, act = KINDS[kind]
    if isinstance(fmt, TensorQuant) and fmt.dtype == "int4":
        return k % 8 == 0 and fmt.group_size % 8 == 0 if act is not None else k % 2 == 0 and fmt.group_size % 2 == 0
    return act is None or fmt.dtype == "fp8_e4m3" or k % 32 == 0


@pytest.mark.parametrize("kind,layout", [(k, "rows") for k in KINDS] + [(k, "tiles") for k in TILED])
@pytest.mark.parametrize("m,n,k", [(1, 9, 64), (2, 4, 100), (3, 13, 172), (5, 130, 576), (50, 7, 96)])
def test_every_kind_matches_the_reference(kind, layout, m, n, k):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    weight, keep, ref_w, act = _weight(kind, w, bias if m % 2 else None)
    if layout == "tiles":
        weight = tiled(weight, keep)
        assert (weight.layout == LAYOUT_PACKED) == tileable(kind, k)
    got = _run(weight, x)
    xin = x if act is None else quantize_input(x, act, ACT_SCALE)   # the inputs the kernels multiply
    exact = xin.double() @ ref_w.T + (bias.double() if m % 2 else 0)
    # fp32 sums of k products of O(1) values in another order (integer kernels: exact sums, scaled in fp32)
    torch.testing.assert_close(got, exact.float(), rtol=1e-5, atol=4e-6 * k ** 0.5 * ref_w.abs().max().item())


@pytest.mark.parametrize("k", [200, 256])                 # a float tail; whole pieces of 32 (int4 tiles)
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_row_is_bit_identical_whatever_the_other_rows(kind, k):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(61, k, generator=g), torch.randn(23, k, generator=g)
    weight, keep, _, _ = _weight(kind, w, None)
    together = _run(weight, x)
    packed_keep: list = []
    packed = tiled(weight, packed_keep)                               # the row-major copy stays in keep
    together_tiled = _run(packed, x)
    for r in (0, 1, 47, 48, 60):            # blocks of 3 (rows) or 6 (panels) rows, chunks of 48 rows
        alone = _run(weight, x[r:r + 1].contiguous(), threads=1)
        assert torch.equal(alone[0], together[r]), f"row {r}"
        assert torch.equal(_run(packed, x[r:r + 1].contiguous())[0], together_tiled[r]), f"row {r}, tiled"


@pytest.mark.parametrize("kind", ["int4-g16-asym-s8", "w4a8-g32-s8"])
@pytest.mark.parametrize("m", [1, 3, 7, 30])           # few rows; 2 blocks; 12+ rows widen the panel (weight-only)
def test_two_level_panels_are_the_fp32_scale_panels_to_the_bit(kind, m):
    """Panels that keep two-level scales as codes and steps (code * step computed in the kernel) give
    exactly what panels of the same weight's decoded fp32 scales give, on 20 groups (a partial last
    super-block of 4) and rows beyond a whole panel."""
    g = torch.Generator().manual_seed(m)
    k = 640 if kind.startswith("w4a8") else 320
    x, w = torch.randn(m, k, generator=g), torch.randn(37, k, generator=g)
    weight, keep, _, _ = _weight(kind, w, None)
    assert weight.super_groups == 8
    plain = Weight.from_buffer_copy(weight)
    plain.scale_code = plain.scale_step = None
    plain.super_groups = 0
    lib = native.library()
    assert lib.llmc_packed_bytes(ctypes.byref(weight)) < lib.llmc_packed_bytes(ctypes.byref(plain))
    held = [list(keep), list(keep)]                  # each keeps its packed bytes alive
    compact, full = tiled(weight, held[0]), tiled(plain, held[1])
    assert compact.layout == full.layout == LAYOUT_PACKED
    assert torch.equal(_run(compact, x), _run(full, x))
