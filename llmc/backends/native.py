"""The native executor of the cpu target: the optimised Graph lowered, once at load, to a plan that
`kernels/cpu/step.c` runs for a whole ragged batch in one call per step.

Lowering: every value of the graph gets a place in one workspace of `capacity` rows (values whose
lives do not overlap share columns; q, k and v are column ranges of the fused qkv output), and
every node becomes an op with its weights laid out for the kernels (the q/k/v and gate/up matrices
concatenated, as the cpu kernel set does). The plan holds pointers into tensors this object keeps
alive. Per step, Python only packs the batch (tokens, positions, slots, per sequence its rows,
context and block table) into arrays.

What it runs: every op the decoder builder and the default passes emit, over matrices stored as
float32, bfloat16 or float16 (read as stored, computed in float32), int8 per channel or int4
group-wise with float16 or two-level scales (weight-only, or multiplied as integers with int8
inputs: w8a8, w4a8) and fp8 e4m3 (inputs through fp8 at their static scale), with a KV cache in the
model's format: fp32, 16-bit, or int8 / fp8 with static per-KV-head scales. `unsupported(model)` says why a model cannot run here (no C
compiler, or a format this list lacks); the cpu kernel set runs those.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Callable

import torch

from llmc.errors import ConfigError
from llmc.engine import RUNTIME_INPUTS
from llmc.ir import OPS, Graph, verify
from llmc.kernels.cpu import concat_rows, native
from llmc.kernels.reference.rope import rope_cos_sin, rope_inv_freq
from llmc.quantized.formats import SUPER_GROUPS, QuantizedWeight, scale_codes, scale_steps
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from llmc.runtime.threads import ThreadPolicy

_I64, _P, _D = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
OP_CODES = {"embed": 1, "rms_norm": 2, "add": 3, "add_rms_norm": 4, "linear": 5, "qkv_linear": 5, "silu_mul": 6,
            "gate_up_silu": 7, "rope": 8, "attention": 9, "logits": 10}
W_F32, W_I8, W_I4, W_BF16, W_F16, W_I4A8, W_I8A8, W_F8 = 0, 1, 2, 3, 4, 5, 6, 7    # kernels/cpu/linear.h
FLOAT_KINDS = {torch.float32: W_F32, torch.bfloat16: W_BF16, torch.float16: W_F16}   # stored as is, fp32 compute
WEIGHT_KINDS = {"int8/channel": W_I8, "int4/group": W_I4, "int4/group-asym": W_I4,  # QuantizedWeight.kernel_key
                "int4/group+int8/group": W_I4A8, "int4/group-asym+int8/group": W_I4A8,   # integer dot products
                "int8/channel+int8/token": W_I8A8,
                "fp8_e4m3/channel+fp8_e4m3/tensor": W_F8}                 # inputs through fp8 at a static scale


class Val(ctypes.Structure):
    _fields_ = [("off", _I64), ("ld", _I64), ("width", _I64)]


LAYOUT_ROWS, LAYOUT_PACKED = 0, 1                   # kernels/cpu/linear.h


class Weight(ctypes.Structure):
    _fields_ = [("kind", _I64), ("n", _I64), ("k", _I64), ("group", _I64), ("data", _P), ("scale", _P),
                ("zero", _P), ("bias", _P), ("layout", _I64), ("act_scale", _P), ("scale_code", _P),
                ("scale_step", _P), ("super_groups", _I64)]


def quantized_weight(w: QuantizedWeight, tensor: Callable[[torch.Tensor], int], bias: int | None = None) -> Weight:
    """`w` as the kernels read it (LAYOUT_ROWS); `tensor(t)` keeps t alive and returns its address. With
    two-level scales, their codes and steps as well: its panels (`tiled`) keep those instead of the fp32
    scales (2.5 bytes a group and row instead of 5)."""
    act_scale = tensor(w.act_scale.float().reshape(-1)) if w.act_scale is not None else None
    out = Weight(WEIGHT_KINDS[w.kernel_key], w.shape[0], w.shape[1], w.fmt.group_size or 0, tensor(w.data),
                 tensor(w.scale.float()), tensor(w.zero) if w.zero is not None else None, bias, LAYOUT_ROWS, act_scale)
    if w.fmt.two_level:
        out.scale_code = tensor(scale_codes(w.scale, w.super_scale))
        out.scale_step = tensor(scale_steps(w.super_scale))
        out.super_groups = SUPER_GROUPS
    return out


def tiled(w: Weight, keep: list) -> Weight:
    """`w` laid out for the kernels (LAYOUT_PACKED, kernels/cpu/linear.h) when it has such a layout:
    the packed bytes replace the row-major tensor in `keep` (which must outlive the returned Weight),
    so a fused matrix stacked for the plan is not held twice. int4 panels (w4a16, w4a8) carry their
    scales and zero points inside the packed bytes; the separate tensors are let go as well."""
    lib = native.library()
    size = lib.llmc_packed_bytes(ctypes.byref(w))
    if size == 0:
        return w
    packed = torch.empty(size, dtype=torch.uint8)
    lib.llmc_pack_weight(ctypes.byref(w), packed.data_ptr())
    out = Weight.from_buffer_copy(w)
    out.data, out.layout = packed.data_ptr(), LAYOUT_PACKED
    dropped = {w.data}
    if w.kind in (W_I4, W_I4A8):
        dropped |= {w.scale, w.zero, w.scale_code, w.scale_step}
        out.scale = out.zero = out.scale_code = out.scale_step = None
    keep[:] = [t for t in keep if not (isinstance(t, torch.Tensor) and t.data_ptr() in dropped)]
    keep.append(packed)
    return out


class Op(ctypes.Structure):
    _fields_ = [("op", _I64), ("inp", _I64 * 3), ("out", _I64 * 2), ("w", Weight), ("i", _I64 * 6), ("f", _D * 2),
                ("cos", _P), ("sin", _P), ("kv_kind", _I64), ("k_scale", _P), ("v_scale", _P)]


KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3,   # kernels/cpu/step.c KV_*
            torch.float8_e4m3fn: 4}


class Plan(ctypes.Structure):
    _fields_ = [("nops", _I64), ("ops", ctypes.POINTER(Op)), ("vals", ctypes.POINTER(Val)), ("ws", _P),
                ("k_cache", _P), ("v_cache", _P), ("block_size", _I64), ("nthreads", ctypes.c_int),
                ("op_seconds", _P)]


class Batch(ctypes.Structure):
    _fields_ = [("T", _I64), ("S", _I64), ("tokens", _P), ("positions", _P), ("slots", _P), ("q_start", _P),
                ("q_len", _P), ("ctx_len", _P), ("block_tables", _P), ("max_blocks", _I64), ("nlogits", _I64),
                ("logit_rows", _P), ("logits", _P)]


def unsupported(model) -> str | None:
    """Why the native executor cannot run `model`, or None."""
    if native.library() is None:
        return f"the native library is unavailable ({native.status()['error']})"
    if model.dtype not in FLOAT_KINDS:
        return f"it runs float32, bfloat16 and float16 weights, not {str(model.dtype).removeprefix('torch.')}"
    if model.kv_dtype not in KV_KINDS:
        return f"it has no KV cache of {str(model.kv_dtype).removeprefix('torch.')}"
    fmt_of = getattr(model.weights, "quantized_format", lambda name: None)
    for n in model.graph.nodes:
        if n.op not in OP_CODES:
            return f"it has no kernel for op {n.op!r}"
        for w in n.inputs[OPS[n.op].num_values:]:
            f = fmt_of(w)
            if f is None:
                continue
            key = f[0].key if f[1] is None else f"{f[0].key}+{f[1].key}"
            if n.op == "embed" and key != "int8/channel":
                return f"it reads float or int8 embeddings, not {key}"
            if key not in WEIGHT_KINDS or (f[1] is not None and f[1].group_size != f[0].group_size):
                return f"it runs int8 per-channel, int4 group-wise and fp8 weights (w8a16, w4a16, w8a8, w4a8, fp8), not " \
                       f"{f[0].key}" + ("" if f[1] is None else f" with {f[1].key} inputs")
    return None


@dataclass
class _Place:
    off: int          # in columns: the region starts at off * capacity floats, a view inside its parent
    width: int
    ld: int           # row stride: the width of the region it lives in
    view: int = 0     # a view's column offset inside its parent's rows


def _layout(steps: list[tuple[tuple[str, ...], tuple[str, ...]]], widths: dict[str, int],
            views: dict[str, tuple[str, int]]) -> tuple[dict[str, _Place], int]:
    """Places for the values the steps (reads, writes) touch: each value that owns storage gets a
    dense region of `width` columns (capacity rows each), reused first-fit once its last reader has
    run; a view (q, k, v) lives in its parent's rows at a column offset. Returns the places and the
    workspace's width in columns."""
    def owner(v: str) -> str:
        return views[v][0] if v in views else v
    last = {owner(v): i for i, (reads, _) in enumerate(steps) for v in reads}
    free: list[tuple[int, int]] = []                      # released (column, width) ranges
    places: dict[str, _Place] = {}
    top = 0
    for i, (reads, writes) in enumerate(steps):
        for v in writes:
            if v in views:
                parent, col = views[v]
                places[v] = _Place(places[parent].off, widths[v], places[parent].ld, col)
                continue
            w = widths[v]
            spot = next((j for j, (_, fw) in enumerate(free) if fw >= w), None)
            if spot is None:
                col, top = top, top + w
            else:
                col, fw = free.pop(spot)
                if fw > w:
                    free.append((col + w, fw - w))
            places[v] = _Place(col, w, w)
        done = {owner(v) for v in reads if last[owner(v)] == i} | {v for v in writes if v not in views and v not in last}
        free += [(places[v].off, places[v].width) for v in done if v in places]
    return places, top


class NativeBackend:
    """The cpu target's native executor: `forward(batch, kv) -> logits`, one native call per step."""

    kernels = "native"

    def __init__(self, model, target: str, device: torch.device | str, capacity: int = 256) -> None:
        why = unsupported(model)
        if why is not None:
            raise ConfigError(f"the native executor cannot run {model.path}: {why}", hint="use --kernels cpu")
        if torch.device(device).type != "cpu":
            raise ConfigError(f"the native executor runs on cpu, not {device}")
        self.target, self.device, self.model = target, torch.device(device), model
        a = model.arch
        self.kv_spec = KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim, model.kv_dtype)
        self._keep: list[Any] = []                     # every tensor a pointer in the plan refers to
        self._calls = 0
        self._threads = ThreadPolicy()
        self._build(model.graph, capacity)
        self._kv: tuple[PagedKVCache, Any, Any] | None = None     # the cache the pointer arrays are of

    # ---- lowering ---------------------------------------------------------------------------------
    def _tensor(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _weight(self, w: Any, bias: torch.Tensor | None = None) -> Weight:
        b = self._tensor(bias.float()) if bias is not None else None
        if isinstance(w, QuantizedWeight):
            return quantized_weight(w, self._tensor, b)
        if w.dtype not in FLOAT_KINDS:
            w = w.float()
        return Weight(FLOAT_KINDS[w.dtype], w.shape[0], w.shape[1], 0, self._tensor(w), None, None, b)

    def _stacked(self, weights: list[Any]) -> Weight:
        """The matrices of a fused node (q/k/v or gate/up) as one, stacked as the cpu kernel set does."""
        fused = concat_rows(tuple(weights))                  # (w[, bias], split sizes)
        return self._weight(fused[0], fused[1] if len(fused) == 3 else None)

    def _build(self, graph: Graph, capacity: int) -> None:
        shapes = verify(graph, self.model.weight_shapes())
        widths = {v: s[-1] for v, s in shapes.items() if v not in RUNTIME_INPUTS}
        views: dict[str, tuple[str, int]] = {}
        steps = []
        for n in graph.nodes:
            reads = tuple(v for v in n.inputs[: OPS[n.op].num_values] if v not in RUNTIME_INPUTS)
            writes = tuple(v for v in n.outputs if v not in graph.outputs)
            if n.op == "qkv_linear":                  # one matmul into a fused value; q, k, v are its columns
                fused, col = _fused(n), 0
                widths[fused] = sum(widths[v] for v in n.outputs)
                for v in n.outputs:
                    views[v] = (fused, col)
                    col += widths[v]
                writes = (fused,) + writes
            steps.append((reads, writes))
        self._places, self._columns = _layout(steps, widths, views)
        self._names = {v: i for i, v in enumerate(self._places)}
        self._graph = graph
        self._ops = (Op * len(graph.nodes))(*(self._op(n) for n in graph.nodes))
        self._op_seconds = torch.zeros(len(graph.nodes), dtype=torch.float64)   # the native step adds to it
        self._resize(capacity)

    def _op(self, n) -> Op:
        get = self.model.weights.get
        spec = OPS[n.op]
        values, weights = n.inputs[: spec.num_values], [get(w) for w in n.inputs[spec.num_values:]]
        ids = [self._names.get(v, -1) for v in values] + [-1] * (3 - len(values))
        outs = n.outputs if n.op != "qkv_linear" else (_fused(n),)
        o = Op(op=OP_CODES[n.op])
        o.inp[:] = ids[:3]
        o.out[:] = [self._names.get(v, -1) for v in outs] + [-1] * (2 - len(outs))
        a = n.attr_dict
        if n.op in ("rms_norm", "add_rms_norm"):
            o.w = Weight(W_F32, 0, 0, 0, self._tensor(weights[0].float()), None, None, None)
            o.i[0], o.f[0] = a["group"], a["eps"]
        elif n.op == "embed":                     # rows widened to fp32 as they are looked up
            o.w = self._weight(weights[0])
        elif n.op in ("linear", "logits"):
            o.w = tiled(self._weight(weights[0], weights[1] if len(weights) > 1 else None), self._keep)
        elif n.op == "qkv_linear":
            o.w = tiled(self._stacked(weights), self._keep)
        elif n.op == "gate_up_silu":
            o.w = tiled(self._stacked(weights), self._keep)
            o.i[0] = weights[0].shape[0]
        elif n.op == "rope":
            params = {k: v for k, v in a.items() if k != "head_dim"}
            positions = torch.arange(self.model.arch.max_position_embeddings)
            cos, sin = rope_cos_sin(positions, rope_inv_freq(a["head_dim"], **params))
            half = a["head_dim"] // 2
            o.cos, o.sin = self._tensor(cos[:, :half]), self._tensor(sin[:, :half])
            o.i[0] = a["head_dim"]
        elif n.op == "attention":
            o.i[:5] = [a["layer"], a["num_heads"], a["num_kv_heads"], a["head_dim"], a["sliding_window"] or 0]
            o.f[1] = a["scale"]
            o.kv_kind = KV_KINDS[self.model.kv_dtype]
            if weights:                           # static per-KV-head scales of a quantized cache
                o.k_scale, o.v_scale = (self._tensor(t.float().reshape(-1)) for t in weights)
        return o

    def _resize(self, capacity: int) -> None:
        """A workspace for `capacity` rows, and the values' places in it."""
        self.capacity = capacity
        self._ws = torch.empty(max(1, self._columns * capacity), dtype=torch.float32)
        vals = [Val(p.off * capacity + p.view, p.ld, p.width) for p in self._places.values()]
        self._vals = (Val * len(vals))(*vals)

    # ---- running ----------------------------------------------------------------------------------
    def allocate_kv(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.kv_spec, num_blocks, block_size, self.device)

    def _cache_pointers(self, kv: PagedKVCache) -> tuple[Any, Any]:
        if self._kv is None or self._kv[0] is not kv:
            ks = (_P * len(kv.k))(*(t.data_ptr() for t in kv.k))
            vs = (_P * len(kv.v))(*(t.data_ptr() for t in kv.v))
            self._kv = (kv, ks, vs)
        return self._kv[1], self._kv[2]

    @torch.inference_mode()
    def forward(self, batch, kv: PagedKVCache) -> torch.Tensor:
        t = len(batch.token_ids)
        if t > self.capacity:
            self._resize(max(t, 2 * self.capacity))
        ks, vs = self._cache_pointers(kv)
        plan = Plan(len(self._graph.nodes), self._ops, self._vals, self._ws.data_ptr(), ctypes.addressof(ks),
                    ctypes.addressof(vs), kv.block_size, self._threads.threads(torch.get_num_threads()),
                    self._op_seconds.data_ptr())
        starts = torch.tensor([0, *batch.query_lens], dtype=torch.int64).cumsum(0)[:-1]
        q_len = torch.tensor(batch.query_lens, dtype=torch.int64)
        ctx_len = torch.tensor(batch.context_lens, dtype=torch.int64)
        width = max(len(b) for b in batch.block_tables)
        tables = torch.zeros(batch.num_seqs, width, dtype=torch.int64)
        for i, b in enumerate(batch.block_tables):
            tables[i, : len(b)] = torch.tensor(b, dtype=torch.int64)
        rows = batch.logit_rows if batch.logit_rows is not None else torch.arange(t)
        rows = rows.to(torch.int64).contiguous()
        logits = torch.empty(len(rows), self.model.arch.vocab_size, dtype=torch.float32)
        tokens, positions, slots = batch.tokens.contiguous(), batch.positions.contiguous(), batch.slot_mapping.contiguous()
        b = Batch(t, batch.num_seqs, tokens.data_ptr(), positions.data_ptr(), slots.data_ptr(), starts.data_ptr(),
                  q_len.data_ptr(), ctx_len.data_ptr(), tables.data_ptr(), width, len(rows), rows.data_ptr(),
                  logits.data_ptr())
        native.library().llmc_step(ctypes.byref(plan), ctypes.byref(b))
        self._calls += 1
        return logits

    def report(self) -> dict[str, Any]:
        """What ran, and where the time went: per op kind, the seconds its ops took inside the native
        steps so far (`profile`, timed in C around each op) and the steps' count."""
        ops = {n.op: {"kernels": "native", "variants": {"native step": self._calls}} for n in self._graph.nodes}
        profile: dict[str, float] = {}
        for n, t in zip(self._graph.nodes, self._op_seconds.tolist()):
            profile[n.op] = profile.get(n.op, 0.0) + t
        return {"target": self.target, "device": str(self.device), "kernels": self.kernels, "ops": ops,
                "profile": {"steps": self._calls, "op_seconds": profile},
                "threads": {"fewer_threads_steps": self._threads.reduced_steps}}

    def reset_profile(self) -> None:
        self._op_seconds.zero_()
        self._calls = 0


def _fused(node) -> str:
    """The name of a qkv_linear node's fused output (q, k and v are views of it)."""
    return node.outputs[0] + "+qkv"
