"""Mixed precision, measured: the sensitivity of each unit of a model (`llmc.passes.quant.sensitivity`
holds the table's types) and the plan a budget gives (`llmc.passes.quant.allocation`), as
`llmc quantize --sensitivity / --target-bpw / --target-size` run them.

For a linear unit the KL is measured once, in its cheapest candidate format, and scaled to the
other formats by their Hessian-weighted output error on the same tokens: sum over its weights of
tr(dW H dW^T), H = sum of x x^T of its input, the error the unit adds to its output, which the rest
of the model carries to the logits the same way whatever format caused it. The head and the
embeddings are measured in every format (the head runs only the final norm and logits; the table
is one probe per format).

The model is walked as calibration walks it (`llmc.calibration.LayerRunner`, one layer at a time
on the cpu kernels): one float pass keeps every layer's input states, then each probe reruns from
its layer to the logits.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor

from llmc.calibration import LayerRunner, layer_nodes
from llmc.checkpoint import ITEMSIZE
from llmc.decoder import EMBED, LM_HEAD
from llmc.errors import OptionError
from llmc.ir import Graph
from llmc.kernels.reference.dequant import dequantize
from llmc.passes.quant.algorithms import InputStats, weight_observer
from llmc.passes.quant.allocation import Plan, allocate
from llmc.passes.quant.observers import Observer
from llmc.passes.quant.sensitivity import (LINEAR_FORMATS, Choice, Sensitivity, Unit, candidates, format_label,
                                           stored_bytes)
from llmc.quantized.formats import TensorQuant, quantize
from llmc.quantized.scheme import QuantRecipe

SENSITIVITY_SAMPLES = 8               # calibration samples the probes run on (the first ones)


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
        for x, names in by_input.items():
            units.append(Unit(_unit_name(names), "linear", tuple(names),
                              tuple(tuple(shape_of(n)) for n in names), i, x))
    return units


def _kl(ref: list[Tensor], logits: list[Tensor]) -> float:
    """Sum over tokens of KL(ref || q), both given as log-probabilities per chunk [T, V]."""
    total = 0.0
    for p, q in zip(ref, logits):
        total += float((p.exp() * (p - q)).sum())
    return total


class _Model:
    """The float model, layer by layer, on a fixed set of token samples; `override` replaces
    weights (by name) for one run."""

    def __init__(self, arch, graph: Graph, get: Callable[[str], Tensor], samples: list[list[int]]) -> None:
        self.arch, self.get = arch, get
        self.runner = LayerRunner(arch, graph, samples)
        self.fp: dict[str, Tensor] = {}
        self.head_name = next(n for n in graph.nodes if n.op == "logits").inputs[1]

    def weight(self, name: str) -> Tensor:
        if name not in self.fp:
            self.fp[name] = self.get(name).float()
        return self.fp[name]

    def _loader(self, override: dict[str, Tensor] | None) -> Callable[[str], Tensor]:
        return self.weight if not override else (lambda n: override[n] if n in override else self.weight(n))

    def layer(self, i: int, hidden: list[Tensor], override: dict[str, Tensor] | None = None,
              capture: tuple[str, ...] = ()):
        return self.runner.run(i, hidden, self._loader(override), capture)

    def rest(self, start: int, hidden: list[Tensor], override: dict[str, Tensor] | None = None) -> list[Tensor]:
        """Log-probabilities of every token, from the states entering layer `start`."""
        for i in range(start, self.arch.num_layers):
            hidden = [h for h, _ in self.layer(i, hidden, override)]
        return self.logprobs(hidden, override)

    def logprobs(self, hidden: list[Tensor], override: dict[str, Tensor] | None = None) -> list[Tensor]:
        return [torch.log_softmax(logits.float(), dim=-1)
                for logits in self.runner.logits(hidden, self._loader(override))]


def measure(arch, graph: Graph, get: Callable[[str], Tensor], dtype_bytes: Callable[[str], int],
            samples: list[list[int]], targets: set[str], observer: Observer | None = None,
            formats: tuple[TensorQuant, ...] = LINEAR_FORMATS,
            on_progress: Callable[[str, int, int], None] | None = None) -> Sensitivity:
    """The sensitivity table of a model (`get`: its float weights by name; `dtype_bytes`: a
    weight's bytes per element as stored) on token `samples`: the decoder linears in `targets`,
    the head and the embedding table."""
    model = _Model(arch, graph, get, samples)
    tokens = sum(map(len, samples))
    L = arch.num_layers

    def shape_of(name: str) -> tuple[int, ...]:       # read once: the float pass uses every unit's weights
        return tuple(model.weight(name).shape)
    units = linear_units(graph, L, shape_of, targets)
    tied = model.head_name == EMBED
    if tied:
        units.append(Unit("model.embed_tokens+lm_head", "embeddings+head", (EMBED,), (shape_of(EMBED),)))
    else:
        units.append(Unit("model.embed_tokens", "embeddings", (EMBED,), (shape_of(EMBED),)))
        units.append(Unit("lm_head", "head", (LM_HEAD,), (shape_of(LM_HEAD),)))
    fmts_of = {u.name: candidates(u, formats) for u in units}

    def q(w: Tensor, fmt: TensorQuant, name: str) -> Tensor:
        return dequantize(quantize(w, fmt, name, observer))

    steps = L + sum(1 if u.kind == "linear" else len(fmts_of[u.name]) - 1 for u in units)
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
        stats = {u.input: InputStats.new(model.weight(u.weights[0]).shape[1], True) for u in by_layer[i]}
        out = []
        for h, caps in model.layer(i, hidden[i], capture=tuple(stats)):
            out.append(h)
            for x in stats:
                stats[x].add(caps[x])
        hidden.append(out)
        for u in by_layer[i]:
            H = stats[u.input].hessian
            errors[u.name] = {}
            for j, f in enumerate(fmts_of[u.name]):
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
    for u in units:
        fmts = fmts_of[u.name]
        itemsize = dtype_bytes(u.weights[0])
        sizes = [sum(stored_bytes(f, s, itemsize) for s in u.shapes) for f in fmts]
        if u.kind == "linear":
            probe = min(range(len(fmts)), key=lambda j: (sizes[j], -errors[u.name][j]))
            override = {n: q(model.weight(n), fmts[probe], n) for n in u.weights}
            kl_probe = _kl(ref, model.rest(u.layer, hidden[u.layer], override)) / tokens
            e0 = errors[u.name][probe]
            row = []
            for j, f in enumerate(fmts):
                kl = kl_probe if j == probe else (kl_probe * errors[u.name][j] / e0 if e0 > 0 else 0.0)
                row.append(Choice(f, sizes[j], max(kl, 0.0), j == probe))
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
    return Sensitivity(tuple(units), choices, tokens)


def probe_kl(arch, graph: Graph, get: Callable[[str], Tensor], samples: list[list[int]],
             replaced: dict[str, Tensor]) -> float:
    """The mean KL (nats per token) of the model with the weights in `replaced` (float values, e.g.
    dequantized) from the float model on `samples`: what the sensitivity table predicts."""
    model = _Model(arch, graph, get, samples)
    hidden = model.runner.embed(model.weight(EMBED))
    ref = model.rest(0, hidden)
    start = model.runner.embed(replaced.get(EMBED, model.weight(EMBED)))
    return _kl(ref, model.rest(0, start, replaced)) / sum(map(len, samples))


def plan(arch, graph: Graph, store, samples: list[list[int]], recipe: QuantRecipe, targets: set[str],
         on_progress: Callable[[str, int, int], None] | None = None) -> tuple[Sensitivity, Plan | None]:
    """The sensitivity table (on the first calibration samples) and, for a target, the plan: the
    formats of least predicted KL within the target's bytes."""
    sensitivity = measure(arch, graph, store.get, lambda n: ITEMSIZE[store.dtype(n)], samples[:SENSITIVITY_SAMPLES],
                          targets, weight_observer(recipe), on_progress=on_progress)
    if not recipe.mixed:
        return sensitivity, None
    numel = sum(u.numel for u in sensitivity.units)
    if recipe.target_bpw is not None:
        return sensitivity, allocate(sensitivity, int(recipe.target_bpw * numel / 8), "target_bpw")
    others = sum(math.prod(store.shape(n)) * ITEMSIZE[store.dtype(n)] for n in set(graph.weight_names())
                 if not any(n in u.weights for u in sensitivity.units))
    if recipe.target_size <= others:
        raise OptionError("target_size", f"{recipe.target_size:,} bytes is less than the tensors that are not "
                          f"quantized already take ({others:,} bytes: norms and the like)")
    return sensitivity, allocate(sensitivity, recipe.target_size - others, "target_size")


def apply_plan(recipe: QuantRecipe, sensitivity: Sensitivity, chosen: Plan) -> tuple[QuantRecipe, dict[str, Any]]:
    """The recipe to carry out (the head and embeddings in their chosen formats) and each decoder
    linear's format."""
    formats, head, embeddings = {}, None, None
    for u in sensitivity.units:
        fmt = chosen.chosen[u.name].fmt
        if u.kind == "linear":
            formats.update({w: fmt for w in u.weights})
        if u.kind in ("head", "embeddings+head"):
            head = fmt
        if u.kind in ("embeddings", "embeddings+head"):
            embeddings = fmt
    return replace(recipe, head=head, embeddings=embeddings), formats
