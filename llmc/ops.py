"""Every op of the Graph, registered once: value inputs, weight slots, attribute schema, shape rule.

Values are 2-D `[T, features]` (T = tokens in the ragged batch) except the graph inputs `tokens`
and `positions` (`[T]`) and the logits (`[N, vocab]`, N = one row per sequence, or per token when
the batch asks for every token's logits). The reference kernel of each op lives in
`llmc.kernels.reference` under the same name.
"""
from __future__ import annotations

from typing import Any, Mapping

from llmc.ir import OpSpec, Shape, register_op

F = (float, int)
I = (int,)
S = (str,)
OPT_I = (int, type(None))


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _embed(a: Mapping[str, Any], v: list[Shape], w: list[Shape]) -> tuple[Shape, ...]:
    _need(len(v[0]) == 1 and len(w[0]) == 2, f"embed wants tokens [T] and a table [V, H], got {v[0]}, {w[0]}")
    return ((v[0][0], w[0][1]),)


def _norm(a: Mapping[str, Any], v: list[Shape], w: list[Shape]) -> Shape:
    x = v[0]
    _need(w[0] == (a["group"],), f"norm weight {w[0]} != ({a['group']},)")
    _need(isinstance(x[-1], int) and x[-1] % a["group"] == 0, f"width {x[-1]} is not a multiple of {a['group']}")
    return x


def _rms_norm(a, v, w):
    return (_norm(a, v, w),)


def _same(a, v, w):
    _need(v[0][-1] == v[1][-1], f"operands differ in width: {v[0]} vs {v[1]}")
    return (v[0],)


def _add_rms_norm(a, v, w):
    _same(a, v, w)
    s = _norm(a, v, w)
    return (s, s)


def _linear_out(x: Shape, weight: Shape, bias: Shape | None) -> Shape:
    _need(len(weight) == 2 and x[-1] == weight[1], f"linear: input {x} does not fit weight {weight}")
    _need(bias is None or bias == (weight[0],), f"linear: bias {bias} does not fit weight {weight}")
    return (x[0], weight[0])


def _linear(a, v, w):
    return (_linear_out(v[0], w[0], w[1] if len(w) > 1 else None),)


def _qkv_linear(a, v, w):
    _need(len(w) in (3, 6), "qkv_linear takes three weights and either no biases or three")
    biases = w[3:] if len(w) == 6 else (None, None, None)
    return tuple(_linear_out(v[0], wi, bi) for wi, bi in zip(w[:3], biases))


def _gate_up_silu(a, v, w):
    g, u = _linear_out(v[0], w[0], None), _linear_out(v[0], w[1], None)
    _need(g == u, f"gate {w[0]} and up {w[1]} differ")
    return (g,)


def _rope(a, v, w):
    q, k, pos = v
    d = a["head_dim"]
    _need(d % 2 == 0, f"rope needs an even head_dim, got {d}")
    _need(q[-1] % d == 0 and k[-1] % d == 0, f"q {q} / k {k} are not whole heads of {d}")
    _need(len(pos) == 1, f"positions must be [T], got {pos}")
    return (q, k)


def _attention(a, v, w):
    q, k, val = v
    d = a["head_dim"]
    _need(all(ws == (a["num_kv_heads"],) for ws in w), f"KV-cache scales {w} != ({a['num_kv_heads']},)")
    _need(q[-1] == a["num_heads"] * d, f"q {q} != {a['num_heads']} heads x {d}")
    _need(k[-1] == val[-1] == a["num_kv_heads"] * d, f"k {k} / v {val} != {a['num_kv_heads']} kv heads x {d}")
    _need(a["num_heads"] % a["num_kv_heads"] == 0, "num_heads must be a multiple of num_kv_heads")
    return ((q[0], q[-1]),)


def _logits(a, v, w):
    _need(v[0][-1] == w[0][1], f"logits: hidden {v[0]} does not fit weight {w[0]}")
    return (("N", w[0][0]),)


NORM_ATTRS = (("eps", F), ("group", I))
ROPE_ATTRS = (("head_dim", I), ("theta", F), ("rope_type", S), ("factor", F), ("low_freq_factor", F),
              ("high_freq_factor", F), ("original_max_positions", I))

register_op(OpSpec("embed", 1, ("table",), 1, (), _embed, "rows of the table for each token id"))
register_op(OpSpec("rms_norm", 1, ("weight",), 1, NORM_ATTRS, _rms_norm,
                   "x / rms(x) * weight, over consecutive groups of `group` features (group < width: per head)"))
register_op(OpSpec("add", 2, (), 1, (), _same, "elementwise sum"))
register_op(OpSpec("add_rms_norm", 2, ("weight",), 2, NORM_ATTRS, _add_rms_norm,
                   "h = x + r; returns (rms_norm(h), h)"))
register_op(OpSpec("linear", 1, ("weight", "bias?"), 1, (), _linear, "x @ weight.T + bias"))
register_op(OpSpec("qkv_linear", 1, ("wq", "wk", "wv", "bq?", "bk?", "bv?"), 3, (), _qkv_linear,
                   "three linears over the same input, as one matmul"))
register_op(OpSpec("silu_mul", 2, (), 1, (), _same, "silu(g) * u"))
register_op(OpSpec("gate_up_silu", 1, ("w_gate", "w_up"), 1, (), _gate_up_silu,
                   "silu(x @ w_gate.T) * (x @ w_up.T), as one matmul"))
register_op(OpSpec("rope", 3, (), 2, ROPE_ATTRS, _rope, "rotary embedding of q and k (rotate-half layout)"))
register_op(OpSpec("attention", 3, ("k_scale?", "v_scale?"), 1,
                   (("layer", I), ("num_heads", I), ("num_kv_heads", I), ("head_dim", I), ("scale", F),
                    ("sliding_window", OPT_I)),
                   _attention, "writes k, v into the paged KV cache (quantized per KV head with the "
                               "optional scales), then causal attention per sequence"))
register_op(OpSpec("logits", 1, ("weight",), 1, (), _logits,
                   "h @ weight.T for each sequence's last token (or every token when asked)"))
