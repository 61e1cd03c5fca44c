"""The KV-cache write in Triton: this step's keys and values k, v [T, kv_heads * head_dim] go to their
slots (block * block_size + offset, the batch's slot_mapping) of the paged caches [num_blocks,
block_size, kv_heads, head_dim], as the reference `write_kv` does (kernels/reference/attention.py):

- a float cache: the values cast to its dtype;
- int8 with per-KV-head scales: round(x / scale) half to even, clamped to +-127;
- fp8 e4m3 with per-KV-head scales: x / scale clamped to +-448, encoded to bytes arithmetically
  (kernels/triton/formats.py), stored through a uint8 view of the cache.
The division is IEEE (div_rn), like torch's, so the stored bytes equal the reference's exactly."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmc.kernels.triton.formats import float_to_e4m3, rint
from llmc.kernels.triton.lazy import check_device

CODES = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}     # quantized cache dtypes; any other: "float"


@triton.jit
def _encode_store(src_ptr, cache_ptr, scale_ptr, src_row, slot_offset, offs, mask, head_dim, CODE: tl.constexpr):
    x = tl.load(src_ptr + src_row + offs, mask=mask, other=0.0)
    if CODE == "float":
        tl.store(cache_ptr + slot_offset + offs, x.to(cache_ptr.dtype.element_ty), mask=mask)
    else:
        scale = tl.load(scale_ptr + offs // head_dim, mask=mask, other=1.0)
        y = tl.math.div_rn(x.to(tl.float32), scale)
        if CODE == "int8":
            code = rint(tl.minimum(tl.maximum(y, -127.0), 127.0)).to(tl.int8)
        else:
            code = float_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
        tl.store(cache_ptr + slot_offset + offs, code, mask=mask)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, width, head_dim, k_stride, v_stride,
                     slot_stride, CODE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)                                   # one program per token: its keys and values
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < width                                    # BLOCK = next pow2 >= kv_heads * head_dim
    _encode_store(k_ptr, kc_ptr, ks_ptr, t * k_stride, slot * slot_stride, offs, mask, head_dim, CODE)
    _encode_store(v_ptr, vc_ptr, vs_ptr, t * v_stride, slot * slot_stride, offs, mask, head_dim, CODE)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """Store k, v [T, kv_heads * head_dim] at `slot_mapping` [T] of the caches (quantized when the
    cache dtype is int8 or fp8 e4m3, with scales [kv_heads])."""
    check_device(k, v, k_cache)
    code = CODES.get(k_cache.dtype, "float")
    if code != "float" and (k_scale is None or v_scale is None):
        raise ValueError(f"a {k_cache.dtype} KV cache needs per-head k and v scales")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous [num_blocks, block_size, kv_heads, head_dim]")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if code == "fp8" else (k_cache, v_cache)
    width, head_dim = k_cache.shape[2] * k_cache.shape[3], k_cache.shape[3]
    if k.shape[0]:
        _write_kv_kernel[(k.shape[0],)](
            k, v, kc, vc, k_scale if k_scale is not None else k, v_scale if v_scale is not None else v,
            slot_mapping, width, head_dim, k.stride(0), v.stride(0), k_cache.stride(1),
            CODE=code, BLOCK=triton.next_power_of_2(width))
