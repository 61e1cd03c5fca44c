"""The optimised Graph as an ONNX model of standard ops (opset 21), with the KV cache as explicit
state, in the layout ONNX Runtime GenAI expects:

    inputs   input_ids [batch, seq] int64, attention_mask [batch, total] int64,
             position_ids [batch, seq] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] float32
    outputs  logits [batch, seq, vocab] float32,
             present.{i}.key / .value [batch, kv_heads, total, head_dim] float32   (total = past + seq)

Each IR op becomes a few standard ops: embed a Gather; rms_norm x * 1/sqrt(mean(x^2) + eps) * w
(per head for q/k norms); linear a MatMul with the weight stored transposed (+ bias); rope a Gather of
precomputed cos/sin tables at position_ids and the rotate-half identity; attention the past keys and
values concatenated with the new ones (the present), the query heads of each kv head stacked for
grouped-query attention (keys and values are not repeated), scaled scores masked by causality (by
index in past + new, so left-padded sequences batch), the attention mask and the sliding window, a
Softmax and a MatMul;
silu_mul g * sigmoid(g) * u; logits a MatMul with the (tied or separate) head.

Float weights (fp32; bf16 / fp16 stored) are exported as fp32. Weight-only quantized matrices (int8
per channel, int4 in groups with zero points, fp8 e4m3) stay quantized: their codes, scales and zero
points are initializers that a DequantizeLinear turns into the fp32 weight (blocked along K for
groups). Quantized inputs are quantized as the reference does it, in standard ops, before the MatMul:
int8 per token (w8a8) or per group (w4a8), fp8 e4m3 per tensor with its static scale (fp8). A
quantized KV cache (int8, fp8 e4m3, per KV-head scales) is state of that type: the new keys and
values go through a QuantizeLinear into the present, and the attention reads the present through a
DequantizeLinear (fp8: the past is dequantized and joined in fp32, then quantized into the present,
since ONNX Runtime's CPU Concat has no fp8 kernel). A 16-bit KV cache is kept as fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmc.errors import UnsupportedModelError

OPSET = 21
NEG = np.float32(np.finfo(np.float32).min)


@dataclass
class _Builder:
    """Accumulates nodes and initializers; names are unique per prefix."""
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs) -> Any:
        from onnx import helper
        outs = [self.name(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: np.ndarray | list, hint: str = "c", dtype=None) -> str:
        from onnx import numpy_helper
        arr = np.asarray(value, dtype=dtype)
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, tensor: torch.Tensor, name: str, transpose: bool = False) -> str:
        from onnx import numpy_helper
        t = tensor.detach().float()
        arr = (t.t() if transpose else t).contiguous().numpy()
        self.inits.append(numpy_helper.from_array(arr, name))
        return name


def _codes_tensor(name: str, codes: torch.Tensor, dtype: str):
    """A TensorProto of codes: int8, uint4 (packed by onnx), or fp8 e4m3 (raw bytes)."""
    from onnx import TensorProto, helper, numpy_helper
    if dtype == "int8":
        return numpy_helper.from_array(codes.to(torch.int8).numpy(), name)
    if dtype == "int4":
        return helper.make_tensor(name, TensorProto.UINT4, list(codes.shape), codes.flatten().tolist())
    if dtype == "fp8_e4m3":
        raw = codes.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(codes.shape), raw, raw=True)
    raise UnsupportedModelError(f"the onnx target cannot store {dtype} codes")


def _dequantize(b: _Builder, qw, name: str, transpose: bool) -> str:
    """A QuantizedWeight as a DequantizeLinear of its codes: [N, K], or [K, N] with `transpose` (the
    MatMul layout, quantized along K in blocks for group-wise formats, which ONNX Runtime fuses into
    its quantized MatMul). The same arithmetic as the reference: (code - zero) * scale in fp32."""
    from onnx import numpy_helper
    fmt, k = qw.fmt, qw.shape[1]
    codes = fmt.number.unpack(qw.data, k)                                  # [N, K]
    scale, zero = qw.scale.float(), qw.zero                                # [N, G] / [N, 1] / [1, 1]
    attrs: dict[str, int] = {}
    if fmt.granularity == "tensor":
        scale, zero = scale.reshape(()), None if zero is None else zero.reshape(())
    elif fmt.granularity == "channel":
        scale, zero = scale[:, 0], None if zero is None else zero[:, 0]
        attrs["axis"] = 1 if transpose else 0
    elif fmt.granularity == "group":
        attrs.update(axis=0 if transpose else 1, block_size=fmt.group_size)
        if transpose:
            scale, zero = scale.t(), None if zero is None else zero.t()
    else:
        raise UnsupportedModelError(f"the onnx target cannot lower {fmt.granularity}-wise weights ({name})")
    if transpose:
        codes = codes.t()
    ins = [name + ".qdata", name + ".scale"]
    b.inits.append(_codes_tensor(ins[0], codes.contiguous(), fmt.dtype))
    b.inits.append(numpy_helper.from_array(scale.contiguous().numpy(), ins[1]))
    if zero is not None:
        ins.append(name + ".zero")
        b.inits.append(_codes_tensor(ins[2], zero.contiguous(), fmt.dtype))
    out = name
    b.nodes.append(_node("DequantizeLinear", ins, [out], **attrs))
    return out


def lower_to_onnx(model) -> Any:
    """The model's optimised graph as an onnx.ModelProto (see the module docstring)."""
    from onnx import TensorProto, helper
    KV_TYPES = {torch.float32: TensorProto.FLOAT, torch.bfloat16: TensorProto.FLOAT,
                torch.float16: TensorProto.FLOAT, torch.int8: TensorProto.INT8,
                torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}

    a = model.arch
    b = _Builder()
    values: dict[str, str] = {}
    weights: dict[str, str] = {}

    def w(name: str, transpose: bool = False) -> str:
        key = f"{name}{'.T' if transpose else ''}"
        if key not in weights:
            t = model.weights.get(name)
            if isinstance(t, torch.Tensor):
                weights[key] = b.weight(t, key, transpose)
            else:
                weights[key] = _dequantize(b, t, key, transpose)
        return weights[key]

    fake_quantized: dict[tuple[str, str], str] = {}

    def quantized_input(x: str, weight: str) -> str:
        """x as the weight's quantized linear really multiplies it (kernels/reference/quant.py)."""
        t = model.weights.get(weight)
        if isinstance(t, torch.Tensor) or t.act is None:
            return x
        act = t.act
        key = (x, act.key if act.granularity != "tensor" else f"{act.key}:{weight}")
        if key not in fake_quantized:
            if act.dtype == "int8" and act.granularity in ("token", "group"):
                fake_quantized[key] = _fake_quant_int8(b, x, act.group_size if act.granularity == "group" else None,
                                                       model.weights.shape(weight)[1])
            elif act.dtype == "fp8_e4m3" and act.granularity == "tensor":
                fake_quantized[key] = _fake_quant_fp8(b, x, float(t.act_scale.reshape(())))
            else:
                raise UnsupportedModelError(f"the onnx target cannot lower inputs in {act.key} ({weight})")
        return fake_quantized[key]

    axes_last = b.const([-1], "axes_last", np.int64)
    zero_axis = b.const([0], "axis0", np.int64)

    def rms(x: str, weight: str, eps: float, group: int, width: int) -> str:
        xg = x if group == width else b.op("Reshape", [x, b.const([0, 0, width // group, group], "shape", np.int64)])
        ms = b.op("ReduceMean", [b.op("Mul", [xg, xg]), axes_last], keepdims=1)
        inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, b.const(np.float32(eps), "eps")])])])
        y = b.op("Mul", [b.op("Mul", [xg, inv]), w(weight)])
        return y if group == width else b.op("Reshape", [y, b.const([0, 0, width], "shape", np.int64)])

    def linear(x: str, weight: str, bias: str | None) -> str:
        y = b.op("MatMul", [quantized_input(x, weight), w(weight, transpose=True)])
        return b.op("Add", [y, w(bias)]) if bias else y

    # rope tables [max_positions, head_dim] and the position ids' rows of them, shared by every layer
    from llmc.kernels.reference.rope import rope_cos_sin, rope_inv_freq
    r = a.rope
    inv = rope_inv_freq(a.head_dim, theta=r.theta, rope_type=r.rope_type, factor=r.factor,
                        low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                        original_max_positions=r.original_max_positions)
    cos_t, sin_t = rope_cos_sin(torch.arange(a.max_position_embeddings), inv)
    cos = b.op("Unsqueeze", [b.op("Gather", [b.const(cos_t.numpy(), "cos_table"), "position_ids"]),
                             b.const([2], "axis2", np.int64)])                 # [B, S, 1, d]
    sin = b.op("Unsqueeze", [b.op("Gather", [b.const(sin_t.numpy(), "sin_table"), "position_ids"]),
                             b.const([2], "axis2", np.int64)])
    half = a.head_dim // 2

    def rotate(x: str, heads: int) -> str:
        xh = b.op("Reshape", [x, b.const([0, 0, heads, a.head_dim], "shape", np.int64)])
        x1, x2 = b.op("Split", [xh, b.const([half, half], "split", np.int64)], n_out=2, axis=-1)
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
        y = b.op("Add", [b.op("Mul", [xh, cos]), b.op("Mul", [rot, sin])])
        return b.op("Reshape", [y, b.const([0, 0, heads * a.head_dim], "shape", np.int64)])

    # the attention mask, shared by the layers without a sliding window. Keys and queries are
    # ordered by index in [past ‖ new] (length T); the new ones are the last S. Key j is visible to
    # the query at index i when j <= i and attention_mask[b, j] == 1: sequences of different lengths
    # batch together left-padded (mask 0 on the padding), as ONNX Runtime GenAI batches them, while
    # rope reads the real positions from position_ids.
    total = b.op("Shape", ["attention_mask"], start=1, end=2)                 # [1]
    t_scalar = b.op("Squeeze", [total, zero_axis])
    key_pos = b.op("Range", [b.const(np.int64(0), "zero"), t_scalar, b.const(np.int64(1), "one")])   # [T]
    s_scalar = b.op("Squeeze", [b.op("Shape", ["input_ids"], start=1, end=2), zero_axis])
    q_pos = b.op("Unsqueeze", [b.op("Range", [b.op("Sub", [t_scalar, s_scalar]), t_scalar,
                                              b.const(np.int64(1), "one")]),
                               b.const([1], "axis1", np.int64)])             # [S, 1]
    causal = b.op("LessOrEqual", [key_pos, q_pos])                            # [S, T]
    valid = b.op("Unsqueeze", [b.op("Cast", ["attention_mask"], to=TensorProto.BOOL),
                               b.const([1], "axis1", np.int64)])              # [B, 1, T]
    base_mask = b.op("And", [causal, valid])
    masks: dict[int | None, str] = {}

    def mask_for(window: int | None) -> str:
        if window not in masks:
            m = base_mask
            if window is not None:
                near = b.op("Less", [b.op("Sub", [q_pos, key_pos]), b.const(np.int64(window), "window")])
                m = b.op("And", [m, near])
            bias = b.op("Where", [m, b.const(np.float32(0), "zero_f"), b.const(NEG, "neg")])
            masks[window] = b.op("Unsqueeze", [bias, b.const([1, 2], "axes12", np.int64)])   # [B, 1, 1, S, T]
        return masks[window]

    kv_type = KV_TYPES.get(model.kv_dtype)
    if kv_type is None:
        raise UnsupportedModelError(f"the onnx target cannot store a KV cache of {model.kv_dtype}")

    def cached(x: str, layer: int, part: str, scale_name: str | None) -> str:
        """The present keys or values: the past ones and x [B, KV, S, d] after them, stored as the
        cache stores them (quantized per KV head with its scale, as kernels/reference/kv_quant.py
        does: int8 round half to even within +-127, fp8 e4m3 saturating). Returns them as fp32 for
        the attention: values [B, KV, T, d], keys transposed, [B, KV, d, T]."""
        present = f"present.{layer}.{part}"
        transpose = {"perm": [0, 1, 3, 2]} if part == "key" else None
        if scale_name is None:
            b.nodes.append(_node("Concat", [f"past_key_values.{layer}.{part}", x], [present], axis=2))
            return b.op("Transpose", [present], **transpose) if transpose else present
        scale = w(scale_name)                                                   # [KV]
        zero = b.name("kv_zero")                                                # per axis: one per KV head
        b.inits.append(helper.make_tensor(zero, kv_type, [a.num_kv_heads], [0] * a.num_kv_heads))
        if kv_type == TensorProto.INT8:                        # within +-127 (QuantizeLinear reaches -128)
            bound = b.op("Mul", [b.op("Reshape", [scale, b.const([1, -1, 1, 1], "shape", np.int64)]),
                                 b.const(np.float32(127), "c127")])
            x = b.op("Min", [b.op("Max", [x, b.op("Neg", [bound])]), bound])
        q = b.op("QuantizeLinear", [x, scale, zero], axis=1)
        if kv_type == TensorProto.INT8:
            # the keys are transposed as int8, before their DequantizeLinear: ORT 1.32's
            # QDQPropagationTransformer, moving a per-axis int8 DequantizeLinear across a Transpose or
            # Reshape, makes a QuantizeLinear whose zero point type contradicts its output's
            b.nodes.append(_node("Concat", [f"past_key_values.{layer}.{part}", q], [present], axis=2))
            codes = b.op("Transpose", [present], **transpose) if transpose else present
            return b.op("DequantizeLinear", [codes, scale, zero], axis=1)
        # ONNX Runtime's CPU Concat has no fp8 kernel: the past is dequantized, joined in fp32 and
        # quantized again into the present, which gives back the same codes (each value is code x scale)
        past = b.op("DequantizeLinear", [f"past_key_values.{layer}.{part}", scale, zero], axis=1)
        joined = b.op("Concat", [past, b.op("DequantizeLinear", [q, scale, zero], axis=1)], axis=2)
        b.nodes.append(_node("QuantizeLinear", [joined, scale, zero], [present], axis=1))
        return b.op("Transpose", [joined], **transpose) if transpose else joined

    def attention(q: str, k: str, v: str, layer: int, heads: int, kv_heads: int, scale: float,
                  window: int | None, k_scale: str | None, v_scale: str | None) -> str:
        d = a.head_dim
        to_heads = b.const([0, 0, -1, d], "shape", np.int64)
        qh = b.op("Transpose", [b.op("Reshape", [q, to_heads])], perm=[0, 2, 1, 3])        # [B, H, S, d]
        kh = b.op("Transpose", [b.op("Reshape", [k, to_heads])], perm=[0, 2, 1, 3])        # [B, KV, S, d]
        vh = b.op("Transpose", [b.op("Reshape", [v, to_heads])], perm=[0, 2, 1, 3])
        keys_t, vals = cached(kh, layer, "key", k_scale), cached(vh, layer, "value", v_scale)    # [B, KV, d|T, T|d]
        # grouped-query attention without repeating keys and values: the g query heads that share a
        # kv head are stacked along the sequence axis, [B, KV, g*S, d], and their scores masked as
        # [B, KV, g, S, T]
        g = heads // kv_heads
        qg = b.op("Reshape", [qh, b.const([0, kv_heads, -1, d], "shape", np.int64)])
        scores = b.op("Mul", [b.op("MatMul", [qg, keys_t]),
                              b.const(np.float32(scale), "scale")])                    # [B, KV, g*S, T]
        by_head = b.op("Concat", [b.const([0, kv_heads, g, -1], "shape", np.int64), total], axis=0)
        masked = b.op("Add", [b.op("Reshape", [scores, by_head]), mask_for(window)])
        probs = b.op("Reshape", [b.op("Softmax", [masked], axis=-1), b.op("Shape", [scores])])
        out = b.op("Reshape", [b.op("MatMul", [probs, vals]), b.const([0, heads, -1, d], "shape", np.int64)])
        out = b.op("Transpose", [out], perm=[0, 2, 1, 3])                               # [B, S, H, d]
        return b.op("Reshape", [out, b.const([0, 0, heads * d], "shape", np.int64)])

    def silu_mul(g: str, u: str) -> str:
        return b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u])

    def norm_width(weight: str, group: int) -> int:
        """The width of a rms_norm's input: the hidden size, or a per-head norm's heads x group."""
        if group == a.hidden_size:
            return group
        return (a.num_heads if "q_norm" in weight else a.num_kv_heads) * group

    def add_rms_norm(ins, at) -> tuple[str, str]:
        h = b.op("Add", [values[ins[0]], values[ins[1]]])
        return rms(h, ins[2], at["eps"], at["group"], a.hidden_size), h

    def qkv_linear(ins, at) -> tuple[str, ...]:
        biases = ins[4:7] if len(ins) > 4 else (None, None, None)
        return tuple(linear(values[ins[0]], wt, bias) for wt, bias in zip(ins[1:4], biases))

    def attention_op(ins, at) -> tuple[str]:
        scales = (ins[3], ins[4]) if len(ins) > 3 else (None, None)
        return (attention(values[ins[0]], values[ins[1]], values[ins[2]], at["layer"], at["num_heads"],
                          at["num_kv_heads"], at["scale"], at["sliding_window"], *scales),)

    lowerings = {  # IR op -> (its value and weight inputs, its attributes) -> the ONNX names of its outputs
        "embed": lambda ins, at: (b.op("Gather", [w(ins[1]), "input_ids"]),),
        "rms_norm": lambda ins, at: (rms(values[ins[0]], ins[1], at["eps"], at["group"],
                                         norm_width(ins[1], at["group"])),),
        "add_rms_norm": add_rms_norm,
        "add": lambda ins, at: (b.op("Add", [values[ins[0]], values[ins[1]]]),),
        "linear": lambda ins, at: (linear(values[ins[0]], ins[1], ins[2] if len(ins) > 2 else None),),
        "qkv_linear": qkv_linear,
        "gate_up_silu": lambda ins, at: (silu_mul(linear(values[ins[0]], ins[1], None),
                                                  linear(values[ins[0]], ins[2], None)),),
        "silu_mul": lambda ins, at: (silu_mul(values[ins[0]], values[ins[1]]),),
        "rope": lambda ins, at: (rotate(values[ins[0]], a.num_heads), rotate(values[ins[1]], a.num_kv_heads)),
        "attention": attention_op,
        "logits": lambda ins, at: (b.op("MatMul", [values[ins[0]], w(ins[1], transpose=True)]),),
    }
    for node in model.graph.nodes:
        lowering = lowerings.get(node.op)
        if lowering is None:
            raise UnsupportedModelError(f"the onnx target cannot lower op {node.op!r}")
        values.update(zip(node.outputs, lowering(node.inputs, dict(node.attrs))))
    b.nodes.append(_node("Identity", [values[model.graph.outputs[0]]], ["logits"]))

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = [a.num_kv_heads, a.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", a.vocab_size])]
    for i in range(a.num_layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", kv_type,
                                                        ["batch", kv[0], "past", kv[1]]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", kv_type,
                                                         ["batch", kv[0], "total", kv[1]]))
    graph = helper.make_graph(b.nodes, "llmc", inputs, outputs, initializer=b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="llmc")


def _fake_quant_int8(b: _Builder, x: str, group: int | None, k: int) -> str:
    """Symmetric int8 over each row (group None) or each group of `group` features of a row: scale =
    absmax / 127 (1 for all zeros), q = round half to even, clipped to +-127, then q * scale."""
    v = x
    if group is not None:
        g = -(-k // group)
        pad = b.const([0, 0, 0, 0, 0, g * group - k], "pads", np.int64)
        v = b.op("Reshape", [b.op("Pad", [x, pad]), b.const([0, 0, g, group], "shape", np.int64)])
    amax = b.op("ReduceMax", [b.op("Abs", [v]), b.const([-1], "axes_last", np.int64)], keepdims=1)
    scale = b.op("Where", [b.op("Greater", [amax, b.const(np.float32(0), "zero_f")]),
                           b.op("Div", [amax, b.const(np.float32(127), "c127")]), b.const(np.float32(1), "one_f")])
    q = b.op("Clip", [b.op("Round", [b.op("Div", [v, scale])]), b.const(np.float32(-127), "lo"),
                      b.const(np.float32(127), "hi")])
    y = b.op("Mul", [q, scale])
    if group is None:
        return y
    flat = b.op("Reshape", [y, b.const([0, 0, g * group], "shape", np.int64)])
    return b.op("Slice", [flat, b.const([0], "start", np.int64), b.const([k], "end", np.int64),
                          b.const([-1], "axes_last", np.int64)])


def _fake_quant_fp8(b: _Builder, x: str, scale: float) -> str:
    """x through fp8 e4m3 with a static per-tensor scale, saturating at +-448, rounding to nearest even
    (as torch's cast): a QuantizeLinear / DequantizeLinear pair (ONNX Runtime folds a float -> fp8 ->
    float Cast chain away as if it were lossless, which a Q/DQ pair it keeps)."""
    from onnx import TensorProto, helper
    s = b.const(np.float32(scale), "act_scale")
    zero = b.name("fp8_zero")
    b.inits.append(helper.make_tensor(zero, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    q = b.op("QuantizeLinear", [x, s, zero], saturate=1)
    return b.op("DequantizeLinear", [q, s, zero])


def _node(op_type: str, inputs: list[str], outputs: list[str], **attrs):
    from onnx import helper
    return helper.make_node(op_type, inputs, outputs, name=f"n_{outputs[0]}", **attrs)
