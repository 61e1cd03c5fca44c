"""The `triton` kernel set: Triton kernels for NVIDIA GPUs, one module per subject (norm, rope,
activation, linear, kv_write, attention), every one the twin of a reference kernel and tested against
it (on the CPU under TRITON_INTERPRET=1, tests/kernels/test_triton_kernels.py).

Importing this package registers the set and needs no triton: the kernel modules, which do, are
imported when a kernel first runs (kernels/triton/lazy.py). The batch-preparation hook builds the
attention plan (kernels/triton/plan.py) once per step. Ops whose work is a gather or an elementwise
add (embed, add, and the row selection of logits) are torch on the GPU on purpose, registered here by
name like every other op, so no op falls back silently. Linears note which kernel ran (`triton GEMV
(int4)`, `triton GEMM (float)`, ...).
"""
from __future__ import annotations

import torch.nn.functional as F

from llmc.kernels import register_kernel, register_kernel_set
from llmc.kernels.cpu import concat_rows
from llmc.kernels.reference.dequant import dequantize_rows
from llmc.kernels.triton.lazy import module
from llmc.kernels.triton.plan import build_plan
from llmc.quantized.formats import QuantizedWeight

T = register_kernel_set("triton", "Triton kernels for NVIDIA GPUs: fused norms, rope, int8/int4/fp8 GEMV and GEMM, "
                        "paged attention (verified on CPU under TRITON_INTERPRET=1)", prepare_batch=build_plan).name


@register_kernel("embed", T)
def _embed(ctx, tokens, table):
    # torch on purpose: a row gather, which torch's embedding kernel already does at memory speed;
    # a quantized table's looked-up rows are decoded by the reference (--embeddings int8)
    if isinstance(table, QuantizedWeight):
        return dequantize_rows(table, tokens)
    return F.embedding(tokens, table)


@register_kernel("rms_norm", T)
def _rms_norm(ctx, x, weight, *, eps, group):
    return module("norm").rms_norm(x, weight, eps, group)


@register_kernel("add", T)
def _add(ctx, a, b):
    # torch on purpose: one elementwise add, already at memory speed; the default passes leave none
    # (fuse-add-rms-norm turns every residual add into add_rms_norm), only an unfused graph has them
    return a + b


@register_kernel("add_rms_norm", T)
def _add_rms_norm(ctx, x, r, weight, *, eps, group):
    return module("norm").add_rms_norm(x, r, weight, eps, group)


def _run_linear(ctx, x, weight, bias=None):
    y, variant = module("linear").linear(x, weight, bias)
    ctx.note(variant)
    return y


@register_kernel("linear", T)
def _linear(ctx, x, weight, bias=None):
    return _run_linear(ctx, x, weight, bias)


@register_kernel("qkv_linear", T, prepare=concat_rows)            # the cpu set's fusion: one weight, one matmul
def _qkv_linear(ctx, x, w, *rest):
    bias, sizes = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    return _run_linear(ctx, x, w, bias).split(sizes, dim=-1)


@register_kernel("silu_mul", T)
def _silu_mul(ctx, gate, up):
    return module("activation").silu_mul(gate, up)


@register_kernel("gate_up_silu", T, prepare=concat_rows)
def _gate_up_silu(ctx, x, w, sizes):
    gate, up = _run_linear(ctx, x, w).split(sizes, dim=-1)              # strided views: silu_mul reads them in place
    return module("activation").silu_mul(gate, up)


@register_kernel("rope", T)
def _rope(ctx, q, k, positions, *, head_dim, **params):
    rope = module("rope")
    key = ("rope", head_dim, tuple(sorted(params.items())))
    cs = ctx.scratch.get(key)
    if cs is None:                                                   # once per step, shared by all layers
        cs = ctx.scratch[key] = rope.cos_sin(positions, head_dim, params)
    return rope.apply_rope(q, *cs, head_dim), rope.apply_rope(k, *cs, head_dim)


@register_kernel("attention", T)
def _attention(ctx, q, k, v, k_scale=None, v_scale=None, *, layer, num_heads, num_kv_heads, head_dim, scale,
               sliding_window):
    return module("attention").paged_attention(
        q, k, v, ctx.kv.k[layer], ctx.kv.v[layer], ctx.batch.slot_mapping, ctx.prepared, num_heads, num_kv_heads,
        head_dim, scale, sliding_window, k_scale, v_scale)


@register_kernel("logits", T)
def _logits(ctx, h, weight):
    rows = ctx.batch.logit_rows                     # torch on purpose: the row selection is a gather
    return _run_linear(ctx, h if rows is None else h.index_select(0, rows), weight)
