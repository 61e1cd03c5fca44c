"""Fusion passes: fewer, larger ops for the executor. Each is pure and idempotent."""
from __future__ import annotations

from dataclasses import replace

from llmc.ir import Graph, Node
from llmc.passes.registry import NoConfig, register_pass

SIDE_EFFECTS = frozenset({"attention"})     # writes the KV cache: never dead


def _consumers(g: Graph) -> dict[str, list[Node]]:
    users: dict[str, list[Node]] = {}
    for n in g.nodes:
        for v in n.inputs:
            users.setdefault(v, []).append(n)
    return users


def _rebuild(g: Graph, replace_at: dict[int, Node], drop: set[int]) -> Graph:
    nodes = []
    for i, n in enumerate(g.nodes):
        if i in replace_at:
            nodes.append(replace_at[i])
        elif i not in drop:
            nodes.append(n)
    return replace(g, nodes=tuple(nodes))


@register_pass("fuse-add-rms-norm")
def fuse_add_rms_norm(g: Graph, cfg: NoConfig) -> Graph:
    """add(x, r) -> h followed by rms_norm(h, w) -> y becomes add_rms_norm(x, r, w) -> (y, h) at the
    add's place, so h stays available to its other users (the next residual add)."""
    index = {id(n): i for i, n in enumerate(g.nodes)}
    producer = g.producers()
    replace_at, drop = {}, set()
    for i, n in enumerate(g.nodes):
        if n.op != "rms_norm":
            continue
        src = producer.get(n.inputs[0])
        j = index[id(src)] if src is not None else None
        if src is None or src.op != "add" or j in replace_at:
            continue
        replace_at[j] = Node("add_rms_norm", src.inputs + n.inputs[1:], n.outputs + src.outputs, n.attrs)
        drop.add(i)
    return _rebuild(g, replace_at, drop)


@register_pass("fuse-qkv")
def fuse_qkv(g: Graph, cfg: NoConfig) -> Graph:
    """The q, k, v linears of one attention (same input; all with bias or none) become one
    qkv_linear, placed where the first of them was."""
    index = {id(n): i for i, n in enumerate(g.nodes)}
    producer = g.producers()
    replace_at, drop = {}, set()

    def linear_behind(v: str) -> Node | None:
        n = producer.get(v)
        if n is not None and n.op == "rms_norm" and g.uses(v) == 1:     # qwen3's per-head q/k norm
            n = producer.get(n.inputs[0])
        return n if n is not None and n.op == "linear" else None

    for att in g.nodes:
        if att.op != "attention":
            continue
        rope = producer.get(att.inputs[0])
        if rope is None or rope.op != "rope" or producer.get(att.inputs[1]) is not rope:
            continue
        q, k, v = linear_behind(rope.inputs[0]), linear_behind(rope.inputs[1]), producer.get(att.inputs[2])
        trio = (q, k, v)
        if any(n is None or n.op != "linear" for n in trio):
            continue
        if len({n.inputs[0] for n in trio}) != 1 or len({len(n.inputs) for n in trio}) != 1:
            continue
        if any(g.uses(n.outputs[0]) != 1 for n in trio):
            continue
        weights = tuple(n.inputs[1] for n in trio) + tuple(n.inputs[2] for n in trio if len(n.inputs) == 3)
        fused = Node("qkv_linear", (q.inputs[0],) + weights, tuple(n.outputs[0] for n in trio))
        positions = sorted(index[id(n)] for n in trio)
        replace_at[positions[0]] = fused
        drop.update(positions[1:])
    return _rebuild(g, replace_at, drop)


@register_pass("fuse-gate-up-silu")
def fuse_gate_up_silu(g: Graph, cfg: NoConfig) -> Graph:
    """silu_mul(linear(x, wg), linear(x, wu)) without biases becomes gate_up_silu(x, wg, wu)."""
    index = {id(n): i for i, n in enumerate(g.nodes)}
    producer = g.producers()
    replace_at, drop = {}, set()
    for i, n in enumerate(g.nodes):
        if n.op != "silu_mul":
            continue
        gate, up = producer.get(n.inputs[0]), producer.get(n.inputs[1])
        if gate is None or up is None or gate.op != "linear" or up.op != "linear":
            continue
        if len(gate.inputs) != 2 or len(up.inputs) != 2 or gate.inputs[0] != up.inputs[0]:
            continue
        if g.uses(gate.outputs[0]) != 1 or g.uses(up.outputs[0]) != 1:
            continue
        replace_at[i] = Node("gate_up_silu", (gate.inputs[0], gate.inputs[1], up.inputs[1]), n.outputs)
        drop.update((index[id(gate)], index[id(up)]))
    return _rebuild(g, replace_at, drop)


@register_pass("dce")
def dead_code_elimination(g: Graph, cfg: NoConfig) -> Graph:
    """Drop nodes none of whose outputs is used (ops with side effects stay)."""
    while True:
        dead = {i for i, n in enumerate(g.nodes)
                if n.op not in SIDE_EFFECTS and all(g.uses(o) == 0 for o in n.outputs)}
        if not dead:
            return g
        g = _rebuild(g, {}, dead)
