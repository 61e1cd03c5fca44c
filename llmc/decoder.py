"""The decoder-only transformer as a Graph, built from an ArchConfig.

llama, mistral, qwen2 and qwen3 are one graph with switches (biases, q/k norms, sliding windows),
so there is one builder, not a model file per architecture. Weight names are the Hugging Face
names, so a checkpoint's tensors are referenced as they are stored.
"""
from __future__ import annotations

from llmc.arch import ArchConfig
from llmc.ir import Graph, Node


def _layer_weights(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "in_norm": p + "input_layernorm.weight",
        "post_norm": p + "post_attention_layernorm.weight",
        "q": p + "self_attn.q_proj.", "k": p + "self_attn.k_proj.", "v": p + "self_attn.v_proj.",
        "o": p + "self_attn.o_proj.",
        "q_norm": p + "self_attn.q_norm.weight", "k_norm": p + "self_attn.k_norm.weight",
        "gate": p + "mlp.gate_proj.", "up": p + "mlp.up_proj.", "down": p + "mlp.down_proj.",
    }


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def build_decoder_graph(arch: ArchConfig) -> Graph:
    a = arch
    nodes: list[Node] = []

    def emit(op: str, inputs: tuple[str, ...], outputs: tuple[str, ...], **attrs) -> None:
        nodes.append(Node(op, inputs, outputs, tuple(attrs.items())))

    def linear(x: str, prefix: str, out: str, bias: bool) -> None:
        emit("linear", (x, prefix + "weight") + ((prefix + "bias",) if bias else ()), (out,))

    norm = dict(eps=a.rms_norm_eps, group=a.hidden_size)
    rope = dict(head_dim=a.head_dim, theta=a.rope.theta, rope_type=a.rope.rope_type, factor=a.rope.factor,
                low_freq_factor=a.rope.low_freq_factor, high_freq_factor=a.rope.high_freq_factor,
                original_max_positions=a.rope.original_max_positions)
    emit("embed", ("tokens", EMBED), ("h0",))
    h = "h0"
    for i in range(a.num_layers):
        w, L = _layer_weights(i), f"l{i}."
        emit("rms_norm", (h, w["in_norm"]), (L + "x",), **norm)
        for name in "qkv":
            linear(L + "x", w[name], L + name, a.qkv_bias)
        q, k = L + "q", L + "k"
        if a.qk_norm:
            head_norm = dict(eps=a.rms_norm_eps, group=a.head_dim)
            emit("rms_norm", (q, w["q_norm"]), (L + "qn",), **head_norm)
            emit("rms_norm", (k, w["k_norm"]), (L + "kn",), **head_norm)
            q, k = L + "qn", L + "kn"
        emit("rope", (q, k, "positions"), (L + "qr", L + "kr"), **rope)
        emit("attention", (L + "qr", L + "kr", L + "v"), (L + "attn",), layer=i, num_heads=a.num_heads,
             num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, scale=a.head_dim ** -0.5,
             sliding_window=a.sliding_windows[i])
        linear(L + "attn", w["o"], L + "o", a.o_bias)
        emit("add", (h, L + "o"), (L + "h",))
        emit("rms_norm", (L + "h", w["post_norm"]), (L + "y",), **norm)
        linear(L + "y", w["gate"], L + "gate", a.mlp_bias)
        linear(L + "y", w["up"], L + "up", a.mlp_bias)
        emit("silu_mul", (L + "gate", L + "up"), (L + "act",))
        linear(L + "act", w["down"], L + "down", a.mlp_bias)
        emit("add", (L + "h", L + "down"), (f"h{i + 1}",))
        h = f"h{i + 1}"
    emit("rms_norm", (h, FINAL_NORM), ("hn",), **norm)
    emit("logits", ("hn", EMBED if a.tie_word_embeddings else LM_HEAD), ("logits",))
    return Graph(nodes=tuple(nodes), outputs=("logits",))
