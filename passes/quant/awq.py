"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales. For the linears sharing one input
x, search s = mean|x|^a over a grid of a in [0, 1] minimising the output error of quantize(W * s)
applied to x / s; then fold 1/s into the op producing x (an RMSNorm weight, or the rows of the
linear feeding it) and quantize W * s. a = 0 is plain RTN, so the chosen scales never do worse
than RTN on the calibration sample. Optional clip search shrinks each group's range."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.kernels.reference.dequant import dequantize
from llmc.quantized.formats import QuantizedWeight, TensorQuant, quantize


@dataclass(frozen=True, kw_only=True)
class AWQConfig:
    grid: int = 20                    # a in {0, 1/grid, ..., 1}
    clip: bool = False
    clip_grid: int = 10               # shrink ratios 1, 1 - 0.5/clip_grid, ..., 0.5


def output_error(x: Tensor, ws: list[Tensor], qs: list[Tensor]) -> float:
    return sum(float((x @ (w - q).T).pow(2).mean()) for w, q in zip(ws, qs))


def search_scale(x: Tensor, absmean: Tensor, ws: list[Tensor], fmt: TensorQuant,
                 cfg: AWQConfig = AWQConfig()) -> tuple[Tensor, float, float]:
    """(best scales [K], their output error, RTN's output error) on the sample x [T, K]."""
    best_s, best_err, rtn_err = torch.ones_like(absmean), float("inf"), float("nan")
    base = absmean.float().clamp(min=1e-4)
    for j in range(cfg.grid + 1):
        a = j / cfg.grid
        s = base.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        qs = [dequantize(quantize(w * s, fmt)) / s for w in ws]
        err = output_error(x, ws, qs)
        if j == 0:
            rtn_err = err
        if err < best_err:
            best_s, best_err = s, err
    return best_s, best_err, rtn_err


def clip_weight(w: Tensor, x: Tensor, fmt: TensorQuant, cfg: AWQConfig = AWQConfig()) -> Tensor:
    """Per (row, group): the shrunk range max*r (r from 1 down to 0.5) with the least error of
    x_group @ (w_group - q)^T; returns w clamped to the chosen ranges."""
    if fmt.granularity != "group":
        return w
    n, k = w.shape
    gs = fmt.group_size
    out = w.clone()
    for g0 in range(0, k, gs):
        g1 = min(k, g0 + gs)
        wg, xg = w[:, g0:g1], x[:, g0:g1]
        limit = wg.abs().amax(dim=1, keepdim=True)
        best = torch.full((n,), float("inf"))
        for j in range(cfg.clip_grid + 1):
            r = 1 - 0.5 * j / cfg.clip_grid
            c = wg.clamp(-limit * r, limit * r)
            sub = TensorQuant(dtype=fmt.dtype, granularity="channel", symmetric=fmt.symmetric) \
                if fmt.dtype == "int4" else fmt
            q = dequantize(quantize(c, sub)) if fmt.dtype == "int4" else c
            err = (xg @ (wg - q).T).pow(2).mean(dim=0)
            better = err < best
            best = torch.where(better, err, best)
            out[better, g0:g1] = c[better]
    return out


def awq_quantize(ws: dict[str, Tensor], x: Tensor, absmean: Tensor, fmt: TensorQuant,
                 cfg: AWQConfig = AWQConfig()) -> tuple[Tensor, dict[str, QuantizedWeight], float, float]:
    """Scales for one input group, and the group's weights quantized with them (and clipped)."""
    names = list(ws)
    s, err, rtn_err = search_scale(x, absmean, [ws[n] for n in names], fmt, cfg)
    out = {}
    for n in names:
        w = ws[n] * s
        if cfg.clip:
            w = clip_weight(w, x / s, fmt, cfg)
        out[n] = quantize(w, fmt, n)
    return s, out, err, rtn_err
