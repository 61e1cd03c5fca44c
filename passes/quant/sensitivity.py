"""Sensitivity tables: what quantizing each part of a model in each candidate format costs, as the
mean KL divergence (nats per token) of the model's next-token distribution from the float model's,
with only that part quantized. The parts ("units") are the groups of decoder linears that read one
input (q/k/v, gate/up, o, down: one format each, so the fused kernels stay one matmul), the LM head
and the embedding table (one unit when they are tied).

This module holds the table's types and each unit's candidate formats; `llmc.mixed_precision`
measures a table, and `llmc.passes.quant.allocation` chooses formats from it under a budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmc.quantized.formats import SCALE_BITS, TensorQuant
from llmc.quantized.scheme import EMBEDDING_FORMATS, HEAD_FORMATS
from llmc.quantized.store import QuantizedEntry


def _int4(group_size: int, symmetric: bool, scale_bits: int | None = None) -> TensorQuant:
    return TensorQuant(dtype="int4", granularity="group", group_size=group_size, symmetric=symmetric,
                       scale_bits=scale_bits)


# The formats a decoder linear may take: every weight-only format llmc's kernels run.
LINEAR_FORMATS: tuple[TensorQuant, ...] = (
    *(_int4(g, sym) for g in (128, 64, 32) for sym in (True, False)),
    *(_int4(g, sym, SCALE_BITS[0]) for g in (64, 32, 16) for sym in (True, False)),
    TensorQuant(dtype="int8", granularity="channel"),
)


def format_label(fmt: TensorQuant | None) -> str:
    """A format as the plan shows it: float, int8, int4-g32, int4-g32-asym; two-level scales end in
    -s8 (8-bit scale codes): int4-g32-asym-s8."""
    if fmt is None:
        return "float"
    if fmt.granularity == "group":
        two_level = f"-s{fmt.scale_bits}" if fmt.two_level else ""
        return f"{fmt.dtype}-g{fmt.group_size}{'' if fmt.symmetric else '-asym'}{two_level}"
    return fmt.dtype if fmt.granularity == "channel" else fmt.key


@dataclass(frozen=True)
class Unit:
    """Weights that take one format together."""
    name: str                          # model.layers.0.self_attn.q_proj+k_proj+v_proj, lm_head, ...
    kind: str                          # linear | head | embeddings | embeddings+head (tied)
    weights: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    layer: int | None = None           # decoder layer of a linear unit
    input: str | None = None           # the value its linears read (a linear unit)

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

    @property
    def label(self) -> str:
        return format_label(self.fmt)


@dataclass(frozen=True)
class Sensitivity:
    units: tuple[Unit, ...]
    choices: dict[str, tuple[Choice, ...]]        # unit name -> its candidates, fewest bytes first
    tokens: int                                    # tokens the KL is averaged over

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


def candidates(unit: Unit, formats: tuple[TensorQuant, ...] = LINEAR_FORMATS) -> list[TensorQuant | None]:
    """A unit's candidate formats: for linears `formats`, without repeats (a group as wide as the
    input or wider is one group per row, whatever its nominal size; two-level scales only where a
    row holds two whole groups, since with one a super scale per group buys nothing); the head:
    float, int8 or int4;
    the embeddings, tied or not: float or int8."""
    if unit.kind == "head":
        return [None, *HEAD_FORMATS.values()]
    if unit.kind in ("embeddings", "embeddings+head"):
        return [None, *EMBEDDING_FORMATS.values()]
    k = min(s[1] for s in unit.shapes)
    seen, out = set(), []
    for f in formats:
        key = (f.dtype, f.symmetric, min(f.group_size, k) if f.group_size else None, f.scale_bits)
        if key not in seen and not (f.two_level and f.group_size * 2 > k):
            seen.add(key)
            out.append(f)
    return out


