"""The Graph: a small typed SSA graph of ops, the one model representation in llmc.

A node names its op, its inputs (SSA values produced earlier, graph inputs, or weight names), its
outputs and frozen attributes. Which input slots are values and which are weights is the op's
schema (`OpSpec`), registered once per op in `llmc.ops`. `verify` checks a graph against the
schemas and, given weight shapes, runs every op's shape rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from llmc.errors import GraphError
from llmc.registry import Registry

Shape = tuple[Any, ...]  # ints, or symbols such as "T" (tokens in the batch) and "N" (rows of logits)
AttrValue = int | float | str | bool | None


@dataclass(frozen=True)
class Node:
    op: str                                   # a registered op: "rms_norm", "linear", ...
    inputs: tuple[str, ...]                   # value slots first, then weight slots (see OpSpec)
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, AttrValue], ...] = ()   # hashable and order-stable

    def attr(self, name: str) -> AttrValue:
        for key, value in self.attrs:
            if key == name:
                return value
        raise KeyError(f"{self.op} node has no attribute {name!r}")

    @property
    def attr_dict(self) -> dict[str, AttrValue]:
        return dict(self.attrs)


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    inputs: tuple[str, ...] = ("tokens", "positions")

    def uses(self, v: str) -> int:
        return sum(v in n.inputs for n in self.nodes) + (v in self.outputs)

    def producers(self) -> dict[str, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def weight_names(self) -> tuple[str, ...]:
        """Every weight the graph reads, in first-use order."""
        seen: dict[str, None] = {}
        for n in self.nodes:
            for w in n.inputs[OPS[n.op].num_values:]:
                seen.setdefault(w, None)
        return tuple(seen)


ShapeRule = Callable[[Mapping[str, AttrValue], list[Shape], list[Shape]], tuple[Shape, ...]]


@dataclass(frozen=True)
class OpSpec:
    """Schema of one op: value inputs, weight slots (a trailing '?' marks an optional one),
    outputs, attribute types and the shape rule."""

    name: str
    num_values: int
    weights: tuple[str, ...]
    num_outputs: int
    attrs: tuple[tuple[str, tuple[type, ...]], ...]
    shape: ShapeRule
    doc: str = ""

    @property
    def required_weights(self) -> int:
        return sum(not w.endswith("?") for w in self.weights)


OPS: Registry[OpSpec] = Registry("op")


def register_op(spec: OpSpec) -> OpSpec:
    return OPS.add(spec.name, spec)


def verify(g: Graph, weight_shapes: Mapping[str, Shape] | None = None,
           input_shapes: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """Check `g` against the op schemas; with weight shapes, also run the shape rules.

    Graph inputs are `[T]` (token ids, positions) unless `input_shapes` says otherwise. Returns the
    shape of every value (empty shapes when `weight_shapes` is None).
    Raises GraphError naming the first offending node.
    """
    defined: dict[str, Shape] = {name: tuple((input_shapes or {}).get(name, ("T",))) for name in g.inputs}
    weights: set[str] = set()
    for i, n in enumerate(g.nodes):
        where = f"node {i} ({n.op} -> {', '.join(n.outputs)})"
        spec = OPS.get(n.op)
        if spec is None:
            raise GraphError(f"{where}: unknown op {n.op!r}")
        names = [k for k, _ in n.attrs]
        if len(set(names)) != len(names) or set(names) != {k for k, _ in spec.attrs}:
            raise GraphError(f"{where}: attributes {sorted(names)} != schema {sorted(k for k, _ in spec.attrs)}")
        for key, types in spec.attrs:
            if not isinstance(n.attr(key), types) or (isinstance(n.attr(key), bool) and bool not in types):
                raise GraphError(f"{where}: attribute {key}={n.attr(key)!r} is not {types}")
        if len(n.outputs) != spec.num_outputs:
            raise GraphError(f"{where}: {len(n.outputs)} outputs, schema says {spec.num_outputs}")
        values, wts = n.inputs[: spec.num_values], n.inputs[spec.num_values:]
        if len(values) != spec.num_values or not spec.required_weights <= len(wts) <= len(spec.weights):
            raise GraphError(f"{where}: {len(n.inputs)} inputs do not fit the schema of {n.op}")
        for v in values:
            if v not in defined:
                raise GraphError(f"{where}: value {v!r} is used before it is defined")
        for w in wts:
            if w in defined:
                raise GraphError(f"{where}: weight slot names the value {w!r}")
            if weight_shapes is not None and w not in weight_shapes:
                raise GraphError(f"{where}: weight {w!r} is missing")
            weights.add(w)
        for o in n.outputs:
            if o in defined or o in weights:
                raise GraphError(f"{where}: {o!r} is defined twice (SSA)")
        if weight_shapes is None:
            out_shapes: tuple[Shape, ...] = tuple(() for _ in n.outputs)
        else:
            try:
                out_shapes = spec.shape(n.attr_dict, [defined[v] for v in values],
                                        [tuple(weight_shapes[w]) for w in wts])
            except (ValueError, IndexError, KeyError) as e:
                raise GraphError(f"{where}: shape rule failed: {e}") from None
        defined.update(zip(n.outputs, out_shapes))
    for o in g.outputs:
        if o not in defined:
            raise GraphError(f"graph output {o!r} is never defined")
    return defined


# ---------------------------------------------------------------- printing and serialization

def format_graph(g: Graph, shapes: Mapping[str, Shape] | None = None) -> str:
    """One line per node: `%y = rms_norm(%x, @w) {eps=1e-05}`; values are %, weights are @."""
    def show(v: str, is_weight: bool) -> str:
        return f"@{v}" if is_weight else f"%{v}"

    lines = [f"graph({', '.join('%' + i for i in g.inputs)}) -> ({', '.join('%' + o for o in g.outputs)})"]
    for n in g.nodes:
        k = OPS[n.op].num_values if n.op in OPS else len(n.inputs)
        args = ", ".join(show(v, j >= k) for j, v in enumerate(n.inputs))
        outs = ", ".join(f"%{o}" + (f": {list(shapes[o])}" if shapes and o in shapes else "") for o in n.outputs)
        attrs = " {" + ", ".join(f"{key}={val!r}" for key, val in n.attrs) + "}" if n.attrs else ""
        lines.append(f"  {outs} = {n.op}({args}){attrs}")
    return "\n".join(lines) + "\n"


def graph_to_dict(g: Graph) -> dict[str, Any]:
    return {
        "inputs": list(g.inputs),
        "outputs": list(g.outputs),
        "nodes": [{"op": n.op, "inputs": list(n.inputs), "outputs": list(n.outputs), "attrs": dict(n.attrs)}
                  for n in g.nodes],
    }


def graph_from_dict(d: Mapping[str, Any]) -> Graph:
    try:
        nodes = tuple(Node(op=n["op"], inputs=tuple(n["inputs"]), outputs=tuple(n["outputs"]),
                           attrs=tuple((k, v) for k, v in n["attrs"].items())) for n in d["nodes"])
        return Graph(nodes=nodes, outputs=tuple(d["outputs"]), inputs=tuple(d["inputs"]))
    except (KeyError, TypeError, AttributeError) as e:
        raise GraphError(f"malformed graph: {e!r}") from None


import llmc.ops  # noqa: E402,F401  (registers every op; it imports this module's definitions above)
