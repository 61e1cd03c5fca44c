"""Reference rotary position embedding (the rotate-half layout of Hugging Face checkpoints)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def rope_inv_freq(head_dim: int, theta: float, rope_type: str, factor: float, low_freq_factor: float,
                  high_freq_factor: float, original_max_positions: int) -> Tensor:
    """Inverse frequencies [head_dim / 2] for the rope types llmc supports."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low_wavelen = original_max_positions / low_freq_factor
        high_wavelen = original_max_positions / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope type {rope_type!r}")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """positions [T] -> cos, sin [T, head_dim] (fp32), each frequency repeated for both halves."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    """x [T, heads * head_dim], rotated per head with cos/sin [T, head_dim]."""
    t = x.shape[0]
    xh = x.reshape(t, -1, head_dim)
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    return (xh * cos + rotate_half(xh) * sin).reshape(t, -1)


def rope(q: Tensor, k: Tensor, positions: Tensor, head_dim: int, **params) -> tuple[Tensor, Tensor]:
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, **params))
    return apply_rope(q, cos, sin, head_dim), apply_rope(k, cos, sin, head_dim)
