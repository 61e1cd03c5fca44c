"""KV-cache quantization in the graph: every attention node reads its layer's per-KV-head scales
(`model.layers.{i}.self_attn.k_scale` / `v_scale`, fp32 [kv_heads]), calibrated by `quantize`."""
from __future__ import annotations

from dataclasses import replace

from llmc.ir import Graph
from llmc.passes.registry import NoConfig, register_pass


def kv_scale_names(layer: int) -> tuple[str, str]:
    p = f"model.layers.{layer}.self_attn."
    return p + "k_scale", p + "v_scale"


@register_pass("kv-cache-scales")
def attach_kv_scales(g: Graph, cfg: NoConfig) -> Graph:
    nodes = tuple(replace(n, inputs=n.inputs[:3] + kv_scale_names(int(n.attr("layer"))))
                  if n.op == "attention" else n for n in g.nodes)
    return replace(g, nodes=nodes)
