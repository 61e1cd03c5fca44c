"""GPTQ and AWQ on one linear layer, against RTN in the same format."""
from __future__ import annotations

import pytest
import torch

from llmc.passes.quant.awq import AWQConfig, awq_quantize, clip_weight, search_scale
from llmc.kernels.reference.dequant import dequantize
from llmc.quantized.formats import TensorQuant, quantize
from llmc.passes.quant.gptq import GPTQConfig, gptq

FORMATS = [TensorQuant(dtype="int4", granularity="group", group_size=32),
           TensorQuant(dtype="int4", granularity="group", group_size=64, symmetric=False),
           TensorQuant(dtype="int8", granularity="channel")]


def correlated_inputs(t=1024, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(t, 12, generator=g) @ torch.randn(12, k, generator=g)
    return low_rank + 0.2 * torch.randn(t, k, generator=g), torch.randn(48, k, generator=g)


def out_err(x, w, q):
    return float((x @ (w - dequantize(q)).T).pow(2).mean())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.key)
@pytest.mark.parametrize("cfg", [GPTQConfig(), GPTQConfig(act_order=True), GPTQConfig(block_size=16)],
                         ids=["plain", "act-order", "small-blocks"])
def test_gptq_beats_rtn_on_correlated_inputs(fmt, cfg):
    x, w = correlated_inputs()
    q = gptq(w, x.T @ x, fmt, cfg)
    assert q.fmt == fmt and q.shape == tuple(w.shape)
    assert out_err(x, w, q) < 0.5 * out_err(x, w, quantize(w, fmt))


def test_gptq_lazy_blocks_change_only_rounding():
    """Lazy block updates are the same arithmetic in another order: equal up to float rounding."""
    x, w = correlated_inputs(seed=1)
    fmt = FORMATS[0]
    a, b = gptq(w, x.T @ x, fmt, GPTQConfig(block_size=128)), gptq(w, x.T @ x, fmt, GPTQConfig(block_size=32))
    # scales are float16 values: a float rounding difference may move one by a float16 step (2^-10)
    torch.testing.assert_close(a.scale, b.scale, rtol=2 ** -10, atol=0)
    assert (a.data != b.data).float().mean() < 0.01
    assert out_err(x, w, a) == pytest.approx(out_err(x, w, b), rel=0.02)


def test_gptq_handles_dead_inputs():
    x, w = correlated_inputs(seed=2)
    x[:, 5] = 0                                                  # a channel that never fires
    q = gptq(w, x.T @ x, FORMATS[0])
    assert torch.isfinite(dequantize(q)).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.key)
def test_awq_activation_weighted_error_at_or_below_rtn(fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 128, generator=g) * (torch.rand(128, generator=g) * 4) ** 3   # salient channels
    ws = [torch.randn(32, 128, generator=g), torch.randn(16, 128, generator=g)]
    s, err, rtn = search_scale(x, x.abs().mean(0), ws, fmt)
    assert err <= rtn
    assert rtn == pytest.approx(sum(out_err(x, w, quantize(w, fmt)) for w in ws))
    _, quantized, _, _ = awq_quantize({"a": ws[0], "b": ws[1]}, x, x.abs().mean(0), fmt)
    folded = sum(float(((x / s) @ dequantize(quantized[n]).T - x @ w.T).pow(2).mean())
                 for n, w in zip("ab", ws))
    assert folded == pytest.approx(err, rel=1e-4)                # what is stored is what was scored


def test_awq_clip_search_never_hurts():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(256, 64, generator=g), torch.randn(16, 64, generator=g)
    w[:, 3] *= 8                                                 # outliers that clipping can trade away
    fmt = TensorQuant(dtype="int4", granularity="group", group_size=32)
    clipped = clip_weight(w, x, fmt, AWQConfig(clip=True))
    assert out_err(x, w, quantize(clipped, fmt)) <= out_err(x, w, quantize(w, fmt))
