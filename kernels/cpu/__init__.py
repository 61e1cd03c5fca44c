"""The `cpu` kernel set: the fast CPU kernel of every op. Where the reference is already the fastest
torch expression it is registered here on purpose, by name, so no op silently falls back. Its
batch-preparation hook builds the attention plan (index tensors shared by every layer's attention)
once per step. The linears note which variant ran: `native` (the C GEMV of kernels/cpu/native.py)
or a `torch` fallback (the GEMM, after dequantizing quantized weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.errors import ConfigError
from llmc.kernels import register_kernel, register_kernel_set
from llmc.kernels.cpu import native
from llmc.kernels.cpu.attention import AttentionPlans, paged_attention
from llmc.kernels.reference import dense
from llmc.kernels.reference.dequant import dequantize, dequantize_rows
from llmc.kernels.reference.quant import fake_quant_fp8_tensor, fake_quant_int8_groupwise, fake_quant_int8_rowwise
from llmc.kernels.reference.rope import rope_cos_sin, rope_inv_freq
from llmc.quantized.formats import QuantizedWeight
from llmc.registry import Registry

C = register_kernel_set("cpu", "fast CPU kernels: native int8/int4 GEMV for decode, torch GEMM and SDPA",
                        prepare_batch=AttentionPlans).name


@register_kernel("embed", C)
def _embed(ctx, tokens, table):
    if isinstance(table, QuantizedWeight):             # --embeddings int8: only the looked-up rows decoded
        return dequantize_rows(table, tokens)
    return F.embedding(tokens, table)


def rms_norm(x, weight, eps, group):
    t, width = x.shape
    if group == width:
        return F.rms_norm(x, (width,), weight, eps)
    return F.rms_norm(x.reshape(t, width // group, group), (group,), weight, eps).reshape(t, width)


@register_kernel("rms_norm", C)
def _rms_norm(ctx, x, weight, *, eps, group):
    return rms_norm(x, weight, eps, group)


@register_kernel("add", C)
def _add(ctx, a, b):
    return dense.add(a, b)


@register_kernel("add_rms_norm", C)
def _add_rms_norm(ctx, x, r, weight, *, eps, group):
    h = x + r
    return rms_norm(h, weight, eps, group), h


QLINEAR: Registry = Registry("quantized linear")   # TensorQuant.key -> fn(ctx, x, QuantizedWeight, bias)


def register_qlinear(key: str):
    return QLINEAR.decorator(key)


def _few_rows(x) -> bool:
    return x.shape[0] <= native.MAX_ROWS and x.dtype == torch.float32 and native.library() is not None


def _dequantized_gemm(ctx, x, qw, bias):
    """The fallback: the whole weight dequantized by the reference, then torch's GEMM."""
    ctx.note("torch dequantize + GEMM")
    return F.linear(x, dequantize(qw).to(x.dtype), bias)


@register_qlinear("int8/channel")
def _linear_int8(ctx, x, qw, bias):
    if _few_rows(x):
        ctx.note("native int8 GEMV")
        return native.linear_int8(x, qw.data, qw.scale, bias)
    return _dequantized_gemm(ctx, x, qw, bias)                     # prefill: one dequantize, then BLAS


@register_qlinear("int4/group")
@register_qlinear("int4/group-asym")
def _linear_int4(ctx, x, qw, bias):
    if _few_rows(x):
        ctx.note("native int4 GEMV")
        return native.linear_int4(x, qw.data, qw.scale, qw.zero, qw.fmt.group_size, bias)
    if native.library() is not None:                  # prefill: one (native) dequantize, then BLAS
        ctx.note("native dequantize + torch GEMM")
        w = native.dequantize_int4(qw.data, qw.scale, qw.zero, qw.shape[1], qw.fmt.group_size)
        return F.linear(x, w.to(x.dtype), bias)
    return _dequantized_gemm(ctx, x, qw, bias)


@register_qlinear("int8/channel+int8/token")
def _linear_w8a8(ctx, x, qw, bias):
    """Per-token dynamic int8 inputs times int8 weights: integer products summed in fp32."""
    return _linear_int8(ctx, fake_quant_int8_rowwise(x), qw, bias)


@register_qlinear("int4/group+int8/group")
@register_qlinear("int4/group-asym+int8/group")
def _linear_w4a8(ctx, x, qw, bias):
    """Group-wise dynamic int8 inputs times int4 group weights (the native executor multiplies the
    integers; here the quantized inputs go through the float int4 kernels)."""
    return _linear_int4(ctx, fake_quant_int8_groupwise(x, qw.act.group_size), qw, bias)


@register_qlinear("fp8_e4m3/channel+fp8_e4m3/tensor")
def _linear_fp8(ctx, x, qw, bias):
    """fp8 is emulated on CPU: the input goes through e4m3 with its static scale, the weight is
    widened from e4m3, and the product runs in fp32."""
    return _dequantized_gemm(ctx, fake_quant_fp8_tensor(x, qw.act_scale), qw, bias)


def linear(ctx, x, weight, bias=None):
    """Quantized weights: the kernel registered for their format. Few rows (decode): the native
    streaming kernel; more rows: torch's GEMM."""
    if isinstance(weight, QuantizedWeight):
        fn = QLINEAR.get(weight.kernel_key)
        if fn is None:
            raise ConfigError(f"no cpu kernel for weights in format {weight.kernel_key}")
        return fn(ctx, x, weight, bias)
    if native.applies(x, weight):
        ctx.note("native GEMV")
        return native.linear(x, weight, bias)
    ctx.note("torch GEMM")
    return F.linear(x, weight, bias)


@register_kernel("linear", C)
def _linear(ctx, x, weight, bias=None):
    return linear(ctx, x, weight, bias)


def concat_rows(weights, attrs=None):
    """(wq, wk, wv[, bq, bk, bv]) -> (w_cat[, b_cat], split sizes): one matmul instead of three."""
    n = len(weights) // 2 if len(weights) == 6 else len(weights)
    ws, bs = weights[:n], weights[n:]
    sizes = tuple(w.shape[0] for w in ws)
    if isinstance(ws[0], QuantizedWeight):
        w = QuantizedWeight.cat_rows(list(ws))
    else:
        w = torch.cat(ws, dim=0).contiguous()
    fused = (w,) + ((torch.cat(bs, dim=0).contiguous(),) if bs else ())
    return fused + (sizes,)


@register_kernel("qkv_linear", C, prepare=concat_rows)
def _qkv_linear(ctx, x, w, *rest):
    bias, sizes = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
    return linear(ctx, x, w, bias).split(sizes, dim=-1)


@register_kernel("silu_mul", C)
def _silu_mul(ctx, gate, up):
    return F.silu(gate).mul_(up)


@register_kernel("gate_up_silu", C, prepare=concat_rows)
def _gate_up_silu(ctx, x, w, sizes):
    gate, up = linear(ctx, x, w).split(sizes, dim=-1)
    return F.silu(gate).mul_(up)


@register_kernel("rope", C)
def _rope(ctx, q, k, positions, *, head_dim, **params):
    key = ("rope", head_dim, tuple(sorted(params.items())), q.dtype)
    cs = ctx.scratch.get(key)
    if cs is None:                          # once per step, shared by all layers, in broadcast layout
        cos, sin = rope_cos_sin(positions, _inv_freq(head_dim, key[2]))
        half = head_dim // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)     # rotate_half's sign folded in
        cs = ctx.scratch[key] = (cos.to(q.dtype)[:, None, :], sin.to(q.dtype)[:, None, :])
    return _apply_rope(q, *cs, head_dim), _apply_rope(k, *cs, head_dim)


def _apply_rope(x, cos, sin, head_dim):
    """x * cos + rotate_half(x) * sin, where rotate_half's sign already sits in `sin`."""
    t = x.shape[0]
    xh = x.view(t, -1, head_dim) if x.is_contiguous() else x.reshape(t, -1, head_dim)
    half = head_dim // 2
    swapped = torch.cat((xh[..., half:], xh[..., :half]), dim=-1)
    return torch.addcmul(xh * cos, swapped, sin).view(t, -1)


_INV_FREQ: dict = {}


def _inv_freq(head_dim, items):
    if (head_dim, items) not in _INV_FREQ:
        _INV_FREQ[head_dim, items] = rope_inv_freq(head_dim, **dict(items))
    return _INV_FREQ[head_dim, items]


@register_kernel("attention", C)
def _attention(ctx, q, k, v, k_scale=None, v_scale=None, *, layer, num_heads, num_kv_heads, head_dim, scale,
               sliding_window):
    return paged_attention(q, k, v, ctx.kv.k[layer], ctx.kv.v[layer], ctx.batch.slot_mapping,
                           ctx.prepared.plan(sliding_window), num_heads, num_kv_heads, head_dim, scale,
                           k_scale, v_scale)


@register_kernel("logits", C)
def _logits(ctx, h, weight):
    rows = ctx.batch.logit_rows
    return linear(ctx, h if rows is None else h.index_select(0, rows), weight)
