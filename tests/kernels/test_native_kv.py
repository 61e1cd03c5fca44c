"""The native executor's fp8 e4m3 encoder (KV cache, fp8 inputs) against torch's conversion: every
representable value, every midpoint between neighbours (ties go to the even code), values around
the subnormal range and random values up to the saturation bound +-448."""
from __future__ import annotations

import ctypes

import torch

from llmc.kernels.cpu import native


def encode(x: torch.Tensor) -> torch.Tensor:
    x = x.float().contiguous()
    out = torch.empty(x.numel(), dtype=torch.uint8)
    native.library().llmc_e4m3_encode(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def test_e4m3_encoding_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]                       # the two NaN codes
    values = codes.view(torch.float8_e4m3fn).float()
    positive = values[values > 0].unique()
    midpoints = (positive[1:] + positive[:-1]) / 2               # exact in fp32: ties
    g = torch.Generator().manual_seed(0)
    x = torch.cat([values, midpoints, -midpoints, torch.linspace(-0.03, 0.03, 4001),
                   (torch.rand(20000, generator=g) * 2 - 1) * 448, torch.tensor([0.0, -0.0, 448.0, -448.0])])
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    got = encode(x)
    bad = (got != want).nonzero().flatten()
    assert len(bad) == 0, f"{len(bad)} differ, e.g. {x[bad[:5]].tolist()}: {got[bad[:5]].tolist()} vs {want[bad[:5]].tolist()}"
