"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
(H = 2 X^T X / n). Block-wise lazy updates; dampening; optional act-order with static groups (the
group parameters are fixed from the unquantized weight in natural order, so the stored layout
stays the usual group-wise one). Two-level scales: the super scales are fixed from the unquantized
weight's group scales, and each group's scale, found as the walk reaches it, is rounded to them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.quantized.formats import (SUPER_GROUPS, QuantizationError, QuantizedWeight, TensorQuant, codes, decode,
                                    from_codes, grouped, live_groups, params, super_scales, two_level)


@dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False


def gptq(w: Tensor, hessian: Tensor, fmt: TensorQuant, cfg: GPTQConfig = GPTQConfig(),
         name: str = "weight", observer=None, importance: Tensor | None = None) -> QuantizedWeight:
    """w [N, K] with H [K, K] (sum of x x^T over calibration tokens, any positive scaling). Group
    (or channel) scales cover min/max, or the range `observer` (llmc.passes.quant.observers) picks,
    which may weigh each input column's error by `importance` [K]."""
    if fmt.granularity not in ("channel", "group"):
        raise QuantizationError(f"{name}: GPTQ needs per-channel or group-wise weights")
    W = w.float().clone()
    n, k = W.shape
    # float32 throughout, as in the reference implementation: on a 5632-wide input a float64 copy
    # is 254 MB, and every step below works in place or frees what it replaces.
    H = hessian.to(torch.float32, copy=True)
    if not torch.isfinite(W).all() or not torch.isfinite(H).all():
        raise QuantizationError(f"{name}: has NaN or Inf values; refusing to quantize it")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = fmt.group_size if fmt.granularity == "group" else k
    groups = -(-k // gs)
    scales = torch.empty(n, groups)
    zeros = torch.empty(n, groups) if fmt.number.zero_point else None
    def group_params(slab: Tensor, fmt: TensorQuant, first: int):
        if observer is None:
            return params(slab, fmt)
        imp = None if importance is None else importance[first:first + slab.shape[1]].float()
        return observer.params(slab, fmt, imp)
    static = cfg.act_order or fmt.granularity == "channel"
    if static or fmt.two_level:                       # parameters from the unquantized weight
        for g in range(groups):
            s, z = group_params(W[:, g * gs:min(k, (g + 1) * gs)], fmt, g * gs)
            scales[:, g] = s
            if zeros is not None:
                zeros[:, g] = z
    super_scale = live = None
    if fmt.two_level:                                 # super scales fixed from them too (clip later growth)
        live = live_groups(codes(grouped(W, gs), scales[..., None], zeros[..., None], fmt), zeros)
        super_scale = super_scales(scales, live)
        scales = two_level(scales, super_scale, live)
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(k)
    H.diagonal().add_(cfg.damp_percent * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        del H
        Hinv = torch.cholesky_inverse(L)
        del L
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError:
        raise QuantizationError(f"{name}: the calibration Hessian is not positive definite; "
                                "use more calibration samples or a larger dampening") from None
    C = torch.empty(n, k, dtype=fmt.number.code_dtype)
    for b0 in range(0, k, cfg.block_size):
        b1 = min(k, b0 + cfg.block_size)
        W1, Err = W[:, b0:b1].clone(), torch.zeros(n, b1 - b0)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(perm[b0 + i])                    # natural index of this column
            g = col // gs
            if not static and col % gs == 0:           # a group's parameters from its updated weights
                s, z = group_params(_natural_slab(W, W1, b0, i, gs), fmt, col)
                if live is not None:
                    s = two_level(s[:, None], super_scale[:, g // SUPER_GROUPS, None], live[:, g, None])[:, 0]
                scales[:, g] = s
                if zeros is not None:
                    zeros[:, g] = z
            s = scales[:, g]
            z = zeros[:, g] if zeros is not None else None
            c = codes(W1[:, i], s, z, fmt)
            q = decode(c, s, z)
            C[:, col] = c
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
        W[:, b0:b1] = W1
    return from_codes(C, scales, zeros, fmt, name, super_scale)


def _natural_slab(W: Tensor, W1: Tensor, b0: int, i: int, gs: int) -> Tensor:
    """Without act-order the order is natural: the group starting at column b0+i is the current
    (error-updated) columns b0+i .. b0+i+gs, partly inside the block buffer W1, partly after it."""
    inside = W1[:, i:i + gs]
    rest = gs - inside.shape[1]
    return torch.cat([inside, W[:, b0 + W1.shape[1]:b0 + W1.shape[1] + rest]], dim=1) if rest > 0 else inside
