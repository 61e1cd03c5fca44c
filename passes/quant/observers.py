"""Observers: which range of observed values a scale must cover.

An observer looks at values along the last dim (a weight row or group, a sample of a linear's input,
a KV head's keys) and returns the range [lo, hi] the quantization parameters are made for
(`formats.params_from_range`); values outside it saturate.

- `minmax`: the whole range. Nothing saturates; one outlier stretches the scale for everyone.
- `percentile`: |x| up to its `percentile`-th percentile (symmetric formats), or the low and high
  percentiles (asymmetric int4). Saturates the rarest values.
- `mse`: the range max * r, for the shrink ratio r in {1, 1 - MSE_MAX_SHRINK / MSE_GRID, ...,
  1 - MSE_MAX_SHRINK} whose quantize-dequantize squared error is least (r = 1 is minmax, so
  `mse` is never worse than `minmax` on what it observed). With an importance per value (a weight's
  input channels' mean squared activation, llama.cpp's importance matrix: `--imatrix`) the error
  is weighted by it: the scales favour the columns that meet large inputs.

Weights are observed whole; static activation scales (fp8 inputs) and KV-cache scales by the
calibration: `minmax` takes the maximum over every calibration token, the others work on the
sample of rows calibration keeps (`InputStats.SAMPLE_ROWS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from llmc.errors import OptionError
from llmc.quantized.formats import TensorQuant, codes, decode, params_from_range
from llmc.registry import Registry

RangeFn = Callable[[Tensor, TensorQuant, "Observer", "Tensor | None"], tuple[Tensor, Tensor]]
OBSERVERS: Registry[RangeFn] = Registry("observer")
MSE_GRID = 40
MSE_MAX_SHRINK = 0.8


def register_observer(name: str):
    return OBSERVERS.decorator(name)


@dataclass(frozen=True)
class Observer:
    name: str = "minmax"
    percentile: float = 99.99                 # for `percentile`

    def __post_init__(self) -> None:
        if self.name not in OBSERVERS:
            raise OptionError("observer", f"unknown observer {self.name!r}; known: {', '.join(OBSERVERS)}")
        if not 50 < self.percentile <= 100:
            raise OptionError("percentile", f"must be in (50, 100], got {self.percentile}")

    def range(self, x: Tensor, fmt: TensorQuant, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[lo, hi] for the values along x's last dim -> two tensors of shape x.shape[:-1].
        `importance` (broadcast against x): how much each value's error counts (`mse`; the others
        cover values whatever their weight)."""
        return OBSERVERS[self.name](x.float(), fmt, self, importance)

    def params(self, x: Tensor, fmt: TensorQuant, importance: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Scale (and int4 zero point) along x's last dim, as `formats.params` for the chosen range."""
        return params_from_range(*self.range(x, fmt, importance), fmt)

    def static_scale(self, running_max: Tensor, sample: Tensor, fmt: TensorQuant) -> Tensor:
        """The scale of a symmetric format for calibrated values: `running_max` is the exact max |x|
        over every calibration token (what `minmax` uses), `sample` [..., M] a sample of the values."""
        if self.name == "minmax":
            amax = running_max
        else:
            lo, hi = self.range(sample, fmt)
            amax = torch.maximum(lo.abs(), hi.abs())
        return params_from_range(-amax, amax, fmt)[0]


@register_observer("minmax")
def _minmax(x: Tensor, fmt: TensorQuant, obs: Observer, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return x.amin(dim=-1), x.amax(dim=-1)


@register_observer("percentile")
def _percentile(x: Tensor, fmt: TensorQuant, obs: Observer, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    m = x.shape[-1]
    k = min(m, max(1, math.ceil(obs.percentile * m / 100 - 1e-9)))   # the k-th smallest is the percentile
    if fmt.symmetric:
        a = x.abs().kthvalue(k, dim=-1).values
        return -a, a
    return x.kthvalue(m - k + 1, dim=-1).values, x.kthvalue(k, dim=-1).values


@register_observer("mse")
def _mse(x: Tensor, fmt: TensorQuant, obs: Observer, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    lo0, hi0 = _minmax(x, fmt, obs)
    best_lo, best_hi = lo0, hi0
    best = torch.full(lo0.shape, float("inf"))
    w = None                  # as llama.cpp weighs its importance matrix: times the weight's own size
    if importance is not None:
        w = importance.expand_as(x) * (x.pow(2).mean(dim=-1, keepdim=True) + x.pow(2)).sqrt()

    def weighted_sum(t: Tensor) -> Tensor:
        return (t if w is None else t * w).sum(dim=-1)

    def fit(r: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Quantize with the range shrunk by r, keep it where its error is the least so far; return
        its codes, scale and zero point."""
        nonlocal best, best_lo, best_hi
        scale, zero = params_from_range(lo0 * r, hi0 * r, fmt)
        z = None if zero is None else zero[..., None]
        c = codes(x, scale[..., None], z, fmt)
        err = weighted_sum((decode(c, scale[..., None], z) - x).pow(2))
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo0 * r, best_lo), torch.where(better, hi0 * r, best_hi)
        return c, scale, z

    scale1 = params_from_range(lo0, hi0, fmt)[0]
    for j in range(MSE_GRID + 1):
        c, scale, z = fit(torch.full_like(lo0, 1 - MSE_MAX_SHRINK * j / MSE_GRID))
        if fmt.dtype == "fp8_e4m3":
            continue
        # the least-squares scale for the codes this range gives (a scale is r times the scale of
        # the whole range, and the zero point does not move with r): its own r, often between two
        # grid points or beyond 1
        steps = c.float() - (0 if z is None else z)
        den = weighted_sum(steps * steps)
        s_star = torch.where(den > 0, weighted_sum(x * steps) / den.clamp_min(1e-30), scale)
        fit((s_star / scale1).clamp(1 - MSE_MAX_SHRINK, 1.5))
    return best_lo, best_hi
