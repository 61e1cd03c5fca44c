"""Sensitivity: what quantizing each part of a model in each candidate format costs, as the mean KL
divergence (nats per token) of the model's next-token distribution from the float model's, with
only that part quantized, on calibration text.

The parts ("units") are the groups of decoder linears that read one input (q/k/v, gate/up, o,
down: one format each, so the fused kernels stay one matmul), the LM head and the embedding table
(one unit when they are tied). For a linear unit the KL is measured once, in its cheapest candidate
format, and scaled to the other formats by their Hessian-weighted output error on the same tokens,
sum over its weights of tr(dW H dW^T) with H = sum of x x^T of its input: the error the unit adds
to its output, which the rest of the model carries to the logits the same way whatever format
caused it. The head and the embeddings are measured in every format (cheap: the head runs only
the final norm and logits; the table is one probe per format). `llmc.passes.quant.allocation`
chooses formats from the table under a size budget.

Walks the model as calibration does (`llmc.calibration.LayerRunner`, one layer at a time on the
cpu kernels): one float pass keeps every layer's input states, then each probe reruns from its
layer to the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from llmc.calibration import LayerRunner, layer_nodes
from llmc.decoder import EMBED, LM_HEAD
from llmc.ir import Graph
from llmc.kernels.reference.dequant import dequantize
from llmc.passes.quant.algorithms import InputStats
from llmc.passes.quant.observers import Observer
from llmc.quantized.formats import TensorQuant, quantize
from llmc.quantized.scheme import EMBEDDING_FORMATS, HEAD_FORMATS
from llmc.quantized.store import QuantizedEntry

SENSITIVITY_SAMPLES = 8               # calibration samples the probes run on (the first ones)


def _int4(group_size: int, symmetric: bool) -> TensorQuant:
    return TensorQuant(dtype="int4", granularity="group", group_size=group_size, symmetric=symmetric)


# The formats a decoder linear may take: every weight-only format llmc's kernels run.
LINEAR_FORMATS: tuple[TensorQuant, ...] = (
    *(_int4(g, sym) for g in (128, 64, 32) for sym in (True, False)),
    TensorQuant(dtype="int8", granularity="channel"),
)


def format_label(fmt: TensorQuant | None) -> str:
    """A format as the plan shows it: float, int8, int4-g32, int4-g32-asym."""
    if fmt is None:
        return "float"
    if fmt.granularity == "group":
        return f"{fmt.dtype}-g{fmt.group_size}{'' if fmt.symmetric else '-asym'}"
    return fmt.dtype if fmt.granularity == "channel" else fmt.key


@dataclass(frozen=True)
class Unit:
    """Weights that take one format together."""
    name: str                          # model.layers.0.self_attn.q_proj+k_proj+v_proj, lm_head, ...
    kind: str                          # linear | head | embeddings | embeddings+head (tied)
    weights: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    layer: int | None = None           # decoder layer of a linear unit

    @property
    def numel(self) -> int:
        return sum(n * k for n, k in self.shapes)


@dataclass(frozen=True)
class Choice:
    """One format for a unit: the bytes its weights are stored in, and the KL it is predicted to
    add (measured, or scaled from the measured probe by the output error)."""
    fmt: TensorQuant | None            # None: float, as stored
    nbytes: int
    kl: float
    measured: bool
    output_error: float | None = None  # linear units: sum tr(dW H dW^T) / tokens

    @property
    def label(self) -> str:
        return format_label(self.fmt)


@dataclass(frozen=True)
class Sensitivity:
    units: tuple[Unit, ...]
    choices: dict[str, tuple[Choice, ...]]        # unit name -> its candidates, fewest bytes first
    tokens: int                                    # tokens the KL is averaged over
    float_bytes: dict[str, int]                    # unit name -> its bytes as stored now

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "units": [
            {"unit": u.name, "kind": u.kind, "weights": list(u.weights), "params": u.numel,
             "candidates": [{"format": c.label, "bytes": c.nbytes, "kl": c.kl, "measured": c.measured}
                            for c in self.choices[u.name]]} for u in self.units]}

    def ranking(self, label: str = "int4-g128") -> list[tuple[str, float]]:
        """Linear units, most sensitive first: their predicted KL in format `label`."""
        out = []
        for u in self.units:
            c = next((c for c in self.choices[u.name] if c.label == label), None)
            if u.kind == "linear" and c is not None:
                out.append((u.name, c.kl))
        return sorted(out, key=lambda t: -t[1])


def stored_bytes(fmt: TensorQuant | None, shape: tuple[int, int], float_itemsize: int) -> int:
    if fmt is None:
        return shape[0] * shape[1] * float_itemsize
    return QuantizedEntry(fmt, shape).nbytes()


def _unit_name(weights: list[str]) -> str:
    first = weights[0].removesuffix(".weight")
    if len(weights) == 1:
        return first
    prefix = first.rsplit(".", 1)[0]
    return prefix + "." + "+".join(w.removesuffix(".weight").rsplit(".", 1)[1] for w in weights)


def linear_units(graph: Graph, num_layers: int, shape_of: Callable[[str], tuple[int, ...]],
                 targets: set[str]) -> list[Unit]:
    """Per decoder layer, the target linears grouped by the input they read, in graph order."""
    units = []
    for i in range(num_layers):
        by_input: dict[str, list[str]] = {}
        for n in layer_nodes(graph, i):
            if n.op == "linear" and n.inputs[1] in targets:
                by_input.setdefault(n.inputs[0], []).append(n.inputs[1])
        for names in by_input.values():
            units.append(Unit(_unit_name(names), "linear", tuple(names),
                              tuple(tuple(shape_of(n)) for n in names), i))
    return units


def candidates(unit: Unit, formats: tuple[TensorQuant, ...] = LINEAR_FORMATS) -> list[TensorQuant | None]:
    """A unit's candidate formats: for linears `formats`, without repeats (a group as wide as the
    input or wider is one group per row, whatever its nominal size); the head: float, int8 or int4;
    the embeddings, tied or not: float or int8."""
    if unit.kind == "head":
        return [None, *HEAD_FORMATS.values()]
    if unit.kind in ("embeddings", "embeddings+head"):
        return [None, *EMBEDDING_FORMATS.values()]
    k = min(s[1] for s in unit.shapes)
    seen, out = set(), []
    for f in formats:
        key = (f.dtype, f.symmetric, min(f.group_size, k) if f.group_size else None)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _kl(ref: list[Tensor], logits: list[Tensor]) -> float:
    """Sum over tokens of KL(ref || q), both given as log-probabilities per chunk [T, V]."""
    total = 0.0
    for p, q in zip(ref, logits):
        total += float((p.exp() * (p - q)).sum())
    return total


class _Model:
    """The float model, layer by layer, on a fixed set of token samples."""

    def __init__(self, arch, graph: Graph, get: Callable[[str], Tensor], samples: list[list[int]]) -> None:
        self.arch, self.graph, self.get = arch, graph, get
        self.runner = LayerRunner(arch, graph, samples)
        self.fp: dict[str, Tensor] = {}
        final = next(n for n in graph.nodes if n.op == "rms_norm" and n.inputs[0] == f"h{arch.num_layers}")
        logits = next(n for n in graph.nodes if n.op == "logits")
        self.head_name = logits.inputs[1]
        self.tail = Graph(nodes=(final, logits), outputs=("logits",), inputs=(f"h{arch.num_layers}",))

    def weight(self, name: str) -> Tensor:
        if name not in self.fp:
            self.fp[name] = self.get(name).float()
        return self.fp[name]

    def layer(self, i: int, hidden: list[Tensor], override: dict[str, Tensor] | None = None,
              capture: tuple[str, ...] = ()):
        load = (lambda n: override[n] if n in override else self.weight(n)) if override else self.weight
        return self.runner.run(i, hidden, load, capture)

    def rest(self, start: int, hidden: list[Tensor], override: dict[str, Tensor] | None = None) -> list[Tensor]:
        """Log-probabilities of every token, from the states entering layer `start`."""
        for i in range(start, self.arch.num_layers):
            hidden = [h for h, _ in self.layer(i, hidden, override)]
        return self.logprobs(hidden, override)

    def logprobs(self, hidden: list[Tensor], override: dict[str, Tensor] | None = None) -> list[Tensor]:
        from llmc.runtime.executor import Executor
        from llmc.calibration import CALIBRATION_KERNELS
        load = (lambda n: override[n] if n in override else self.weight(n)) if override else self.weight
        ex = Executor(self.tail, load, kernels=CALIBRATION_KERNELS,
                      input_shapes={f"h{self.arch.num_layers}": ("T", self.arch.hidden_size)})
        out = []
        for chunk, h in zip(self.runner.chunks, hidden):
            batch, kv = self.runner._batch(chunk)
            batch.all_logits = True
            logits = ex.run(batch, kv, inputs={f"h{self.arch.num_layers}": h})["logits"]
            out.append(torch.log_softmax(logits.float(), dim=-1))
        return out


def measure(arch, graph: Graph, get: Callable[[str], Tensor], dtype_bytes: Callable[[str], int],
            samples: list[list[int]], targets: set[str], observer: Observer | None = None,
            formats: tuple[TensorQuant, ...] = LINEAR_FORMATS, head: bool = True, embeddings: bool = True,
            on_progress: Callable[[str, int, int], None] | None = None) -> Sensitivity:
    """The sensitivity table of a model (`get`: its float weights by name; `dtype_bytes`: a
    weight's bytes per element as stored) on token `samples`: the decoder linears in `targets`,
    and the head and embedding table when asked."""
    model = _Model(arch, graph, get, samples)
    tokens = sum(map(len, samples))
    L = arch.num_layers
    units = linear_units(graph, L, lambda n: tuple(get(n).shape), targets)
    tied = model.head_name == EMBED
    if embeddings or head:
        shape = tuple(get(EMBED).shape)
        if tied:
            if embeddings and head:
                units.append(Unit("model.embed_tokens+lm_head", "embeddings+head", (EMBED,), (shape,)))
        else:
            if embeddings:
                units.append(Unit("model.embed_tokens", "embeddings", (EMBED,), (shape,)))
            if head:
                units.append(Unit("lm_head", "head", (LM_HEAD,), (tuple(get(LM_HEAD).shape),)))

    def q(w: Tensor, fmt: TensorQuant, name: str) -> Tensor:
        return dequantize(quantize(w, fmt, name, observer))

    steps = sum(1 for u in units if u.kind == "linear") + sum(len(candidates(u)) - 1 for u in units
                                                                 if u.kind != "linear") + L
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(what, done, steps)

    # 1. the float pass: each layer's input states, and each linear unit's output error per format
    hidden = [model.runner.embed(model.weight(EMBED))]
    errors: dict[str, dict[int, float]] = {}
    by_layer = {i: [u for u in units if u.layer == i] for i in range(L)}
    for i in range(L):
        inputs = {}
        for u in by_layer[i]:
            x = next(n.inputs[0] for n in layer_nodes(graph, i) if n.op == "linear" and n.inputs[1] == u.weights[0])
            inputs[u.name] = x
        stats = {x: InputStats.new(model.weight(u.weights[0]).shape[1], True)
                 for u in by_layer[i] for x in [inputs[u.name]]}
        out = []
        for h, caps in model.layer(i, hidden[i], capture=tuple(stats)):
            out.append(h)
            for x in stats:
                stats[x].add(caps[x])
        hidden.append(out)
        for u in by_layer[i]:
            H = stats[inputs[u.name]].hessian
            errors[u.name] = {}
            for j, f in enumerate(candidates(u, formats)):
                e = 0.0
                for name in u.weights:
                    w = model.weight(name)
                    d = w - q(w, f, name)
                    e += float(((d @ H) * d).sum())
                errors[u.name][j] = e / tokens
        del stats
        tick(f"layer {i}")
    ref = model.logprobs(hidden[L])

    # 2. the probes
    choices: dict[str, tuple[Choice, ...]] = {}
    float_bytes: dict[str, int] = {}
    for u in units:
        fmts = candidates(u, formats)
        itemsize = dtype_bytes(u.weights[0])
        float_bytes[u.name] = sum(stored_bytes(None, s, itemsize) for s in u.shapes)
        sizes = [sum(stored_bytes(f, s, itemsize) for s in u.shapes) for f in fmts]
        if u.kind == "linear":
            probe = min(range(len(fmts)), key=lambda j: (sizes[j], -errors[u.name][j]))
            override = {n: q(model.weight(n), fmts[probe], n) for n in u.weights}
            kl_probe = _kl(ref, model.rest(u.layer, hidden[u.layer], override)) / tokens
            e0 = errors[u.name][probe]
            row = []
            for j, f in enumerate(fmts):
                kl = kl_probe if j == probe else (kl_probe * errors[u.name][j] / e0 if e0 > 0 else 0.0)
                row.append(Choice(f, sizes[j], max(kl, 0.0), j == probe, errors[u.name][j]))
            tick(u.name)
        else:
            row = []
            for f, size in zip(fmts, sizes):
                if f is None:
                    row.append(Choice(None, size, 0.0, True))
                    continue
                table = q(model.weight(u.weights[0]), f, u.weights[0])
                if u.kind == "head":
                    logp = model.logprobs(hidden[L], {LM_HEAD: table})
                else:                           # the table looked up; tied: the head reads it too
                    logp = model.rest(0, model.runner.embed(table), {EMBED: table} if tied else None)
                row.append(Choice(f, size, max(_kl(ref, logp) / tokens, 0.0), True))
                tick(f"{u.name} {format_label(f)}")
        choices[u.name] = tuple(sorted(row, key=lambda c: (c.nbytes, c.kl)))
    return Sensitivity(tuple(units), choices, tokens, float_bytes)


def probe_kl(arch, graph: Graph, get: Callable[[str], Tensor], samples: list[list[int]],
             replaced: dict[str, Tensor]) -> float:
    """The mean KL (nats per token) of the model with the weights in `replaced` (float values, e.g.
    dequantized) from the float model on `samples`: what the sensitivity table predicts."""
    model = _Model(arch, graph, get, samples)
    hidden = model.runner.embed(model.weight(EMBED))
    ref = model.rest(0, hidden)
    start = model.runner.embed(replaced.get(EMBED, model.weight(EMBED)))
    return _kl(ref, model.rest(0, start, replaced)) / sum(map(len, samples))


__all__ = ["LINEAR_FORMATS", "SENSITIVITY_SAMPLES", "Choice", "Sensitivity", "Unit", "candidates", "format_label",
           "linear_units", "measure", "probe_kl", "stored_bytes"]
