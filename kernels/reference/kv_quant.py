"""Reference KV-cache quantization: per KV head static scales; int8 (round half to even, +-127) or
fp8 e4m3 (saturating at +-448). One-byte caches are addressed through uint8 views, since not every
indexing op exists for float8 tensors."""
from __future__ import annotations

import torch
from torch import Tensor

KV_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def encode(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """x [T, KV, d] float -> cache values [T, KV, d] of `dtype` with scale [KV]."""
    y = x.float() / scale[None, :, None]
    if dtype == torch.int8:
        return torch.round(y).clamp(-127, 127).to(torch.int8)
    return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def decode(c: Tensor, scale: Tensor, kv_axis: int) -> Tensor:
    """Cache values -> fp32, the scale broadcast along `kv_axis`."""
    shape = [1] * c.dim()
    shape[kv_axis] = scale.numel()
    return c.float() * scale.reshape(shape)


def as_bytes(t: Tensor) -> Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t
