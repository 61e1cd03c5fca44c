"""The Graph: verifier, printer, serialization."""
from __future__ import annotations

import pytest

from llmc.arch import ArchConfig, RopeConfig
from llmc.decoder import build_decoder_graph
from llmc.errors import GraphError
from llmc.ir import Graph, Node, format_graph, graph_from_dict, graph_to_dict, verify

ARCH = ArchConfig(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, max_position_embeddings=16,
                  rope=RopeConfig(), tie_word_embeddings=True, sliding_windows=(None,))


def shapes_for(g: Graph) -> dict:
    a = ARCH
    table = {"embed_tokens": (a.vocab_size, a.hidden_size), "norm": (a.hidden_size,),
             "q_proj.weight": (8, 8), "k_proj.weight": (4, 8), "v_proj.weight": (4, 8), "o_proj.weight": (8, 8),
             "gate_proj.weight": (12, 8), "up_proj.weight": (12, 8), "down_proj.weight": (8, 12),
             "layernorm": (a.hidden_size,)}
    return {w: next(v for k, v in table.items() if k in w) for w in g.weight_names()}


def test_decoder_graph_verifies_with_shapes():
    g = build_decoder_graph(ARCH)
    shapes = verify(g, shapes_for(g))
    assert shapes["logits"] == ("N", 10)
    assert shapes["l0.q"] == ("T", 8) and shapes["l0.k"] == ("T", 4)


def test_roundtrip_and_printer():
    g = build_decoder_graph(ARCH)
    assert graph_from_dict(graph_to_dict(g)) == g
    text = format_graph(g)
    assert "%l0.attn = attention(%l0.qr, %l0.kr, %l0.v) {layer=0" in text
    assert "@model.embed_tokens.weight" in text


@pytest.mark.parametrize("bad,message", [
    (Graph((Node("frobnicate", ("tokens",), ("y",)),), ("y",)), "unknown op"),
    (Graph((Node("add", ("tokens", "nope"), ("y",)),), ("y",)), "used before it is defined"),
    (Graph((Node("add", ("tokens", "positions"), ("tokens",)),), ("tokens",)), "defined twice"),
    (Graph((Node("rms_norm", ("tokens", "w"), ("y",), (("eps", 1e-5),)),), ("y",)), "attributes"),
    (Graph((Node("rms_norm", ("tokens", "w"), ("y",), (("eps", "x"), ("group", 4))),), ("y",)), "is not"),
    (Graph((Node("linear", ("tokens",), ("y",)),), ("y",)), "do not fit the schema"),
    (Graph((Node("add", ("tokens", "positions"), ("y",)),), ("z",)), "never defined"),
])
def test_verifier_rejects(bad, message):
    with pytest.raises(GraphError, match=message):
        verify(bad)


def test_shape_rule_rejects_mismatched_weight():
    g = build_decoder_graph(ARCH)
    shapes = shapes_for(g)
    shapes["model.layers.0.self_attn.k_proj.weight"] = (5, 8)
    with pytest.raises(GraphError, match="shape rule failed"):
        verify(g, shapes)
