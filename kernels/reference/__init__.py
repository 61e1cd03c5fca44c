"""Registers the reference kernel of every op: plain compositions of the functions in this package."""
from __future__ import annotations

from llmc.kernels import register_kernel, register_kernel_set
from llmc.kernels.reference import dense
from llmc.kernels.reference.attention import paged_attention
from llmc.kernels.reference.rope import rope

R = register_kernel_set("reference", "plain, readable torch: the specification every other set is tested "
                        "against").name


@register_kernel("embed", R)
def _embed(ctx, tokens, table):
    return dense.embed(tokens, table)


@register_kernel("rms_norm", R)
def _rms_norm(ctx, x, weight, *, eps, group):
    return dense.rms_norm(x, weight, eps, group)


@register_kernel("add", R)
def _add(ctx, a, b):
    return dense.add(a, b)


@register_kernel("add_rms_norm", R)
def _add_rms_norm(ctx, x, r, weight, *, eps, group):
    h = dense.add(x, r)
    return dense.rms_norm(h, weight, eps, group), h


@register_kernel("linear", R)
def _linear(ctx, x, weight, bias=None):
    return dense.linear(x, weight, bias)


@register_kernel("qkv_linear", R)
def _qkv_linear(ctx, x, wq, wk, wv, bq=None, bk=None, bv=None):
    return dense.linear(x, wq, bq), dense.linear(x, wk, bk), dense.linear(x, wv, bv)


@register_kernel("silu_mul", R)
def _silu_mul(ctx, gate, up):
    return dense.silu_mul(gate, up)


@register_kernel("gate_up_silu", R)
def _gate_up_silu(ctx, x, w_gate, w_up):
    return dense.silu_mul(dense.linear(x, w_gate), dense.linear(x, w_up))


@register_kernel("rope", R)
def _rope(ctx, q, k, positions, *, head_dim, **params):
    return rope(q, k, positions, head_dim, **params)


@register_kernel("attention", R)
def _attention(ctx, q, k, v, k_scale=None, v_scale=None, *, layer, num_heads, num_kv_heads, head_dim, scale,
               sliding_window):
    b = ctx.batch
    return paged_attention(q, k, v, ctx.kv.k[layer], ctx.kv.v[layer], b.slot_mapping, b.query_lens,
                           b.context_lens, b.block_tables, num_heads, num_kv_heads, head_dim, scale,
                           sliding_window, k_scale, v_scale)


@register_kernel("logits", R)
def _logits(ctx, h, weight):
    rows = ctx.batch.logit_rows                     # None: every token's logits
    return dense.linear(h if rows is None else h[rows], weight)
