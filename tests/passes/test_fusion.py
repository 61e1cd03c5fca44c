"""Fusion passes: exact before/after graphs, idempotence, and unchanged model outputs."""
from __future__ import annotations

import pytest
import torch

from llmc.decoder import build_decoder_graph
from llmc.ir import Graph, Node, verify
from llmc.loader import load_model
from llmc.passes import DEFAULT_PIPELINE, PASSES, NoConfig, PassManager
from llmc.passes.fusion import dead_code_elimination, fuse_add_rms_norm, fuse_gate_up_silu, fuse_qkv
from tests.helpers import STORIES, forward_all

N = (("eps", 1e-5), ("group", 4))


def test_fuse_add_rms_norm_keeps_the_sum_for_its_other_users():
    before = Graph((Node("add", ("x", "r"), ("h",)), Node("rms_norm", ("h", "w"), ("y",), N),
                    Node("add", ("h", "y"), ("z",))), ("z",), inputs=("x", "r"))
    after = Graph((Node("add_rms_norm", ("x", "r", "w"), ("y", "h"), N), Node("add", ("h", "y"), ("z",))),
                  ("z",), inputs=("x", "r"))
    assert fuse_add_rms_norm(before, NoConfig()) == after
    assert fuse_add_rms_norm(after, NoConfig()) == after             # running it twice changes nothing


def test_fuse_gate_up_silu():
    before = Graph((Node("linear", ("x", "wg"), ("g",)), Node("linear", ("x", "wu"), ("u",)),
                    Node("silu_mul", ("g", "u"), ("a",))), ("a",), inputs=("x",))
    after = Graph((Node("gate_up_silu", ("x", "wg", "wu"), ("a",)),), ("a",), inputs=("x",))
    assert fuse_gate_up_silu(before, NoConfig()) == after
    assert fuse_gate_up_silu(after, NoConfig()) == after
    with_bias = Graph((Node("linear", ("x", "wg", "bg"), ("g",)),) + before.nodes[1:], ("a",), inputs=("x",))
    assert fuse_gate_up_silu(with_bias, NoConfig()) == with_bias     # no bias slot in the fused op


def test_dce_keeps_side_effects():
    g = Graph((Node("linear", ("x", "w"), ("dead",)),
               Node("attention", ("x", "x", "x"), ("a",), ()),
               Node("linear", ("x", "w"), ("y",))), ("y",), inputs=("x",))
    assert [n.op for n in dead_code_elimination(g, NoConfig()).nodes] == ["attention", "linear"]


@pytest.mark.parametrize("qk_norm,bias", [(False, False), (True, True)])
def test_fuse_qkv_on_a_decoder(qk_norm, bias):
    from llmc.arch import ArchConfig, RopeConfig
    arch = ArchConfig(model_type="qwen3", vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, max_position_embeddings=16,
                      rope=RopeConfig(), tie_word_embeddings=False, qkv_bias=bias, qk_norm=qk_norm,
                      sliding_windows=(None, None))
    g = build_decoder_graph(arch)
    fused = fuse_qkv(g, NoConfig())
    verify(fused)
    ops = [n.op for n in fused.nodes]
    assert ops.count("qkv_linear") == 2 and ops.count("linear") == 2 * 4   # o, gate, up, down per layer
    q = next(n for n in fused.nodes if n.op == "qkv_linear")
    assert len(q.inputs) == (7 if bias else 4)
    assert fuse_qkv(fused, NoConfig()) == fused


def test_default_pipeline_does_not_change_outputs():
    fused = load_model(STORIES)
    plain = load_model(STORIES, passes=())
    assert len(fused.graph.nodes) < len(plain.graph.nodes)
    ids = [1, 403, 407, 261, 378, 432, 383, 286]
    for kernels in ("cpu", "reference"):
        torch.testing.assert_close(forward_all(fused, ids, kernels), forward_all(plain, ids, kernels),
                                   rtol=1e-5, atol=1e-5)


def test_pass_manager_records_and_dumps(tmp_path):
    m = load_model(STORIES, passes=())
    g, records = PassManager(DEFAULT_PIPELINE).run(m.graph, m.weight_shapes(), dump_dir=tmp_path)
    assert [r.name for r in records] == list(DEFAULT_PIPELINE)
    assert records[0].nodes_after < records[0].nodes_before
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "00-input.txt"
    assert "qkv_linear(" in (tmp_path / "01-fuse-qkv.txt").read_text()


def test_register_pass_twice_raises():
    from llmc.passes import register_pass
    with pytest.raises(ValueError):
        register_pass("dce")(lambda g, c: g)
    assert "dce" in PASSES
