"""Backends: the modules that implement targets (llmc.targets). `GraphBackend` runs the engine's
Graph with one kernel set through the executor; the cpu target (and, later, triton) use it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmc.runtime.executor import Executor
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache


class GraphBackend:
    """The model's graph, its weights on `device` and one kernel set: `forward(batch, kv) -> logits`."""

    def __init__(self, model, target: str, kernels: str, device: torch.device | str) -> None:
        self.target, self.kernels, self.device = target, kernels, torch.device(device)
        self.executor = Executor(model.graph, model.weights.get, kernels=kernels, dtype=model.dtype,
                                 device=self.device)
        a = model.arch
        self.kv_spec = KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim, model.kv_dtype)

    def allocate_kv(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.kv_spec, num_blocks, block_size, self.device)

    def forward(self, batch, kv: PagedKVCache) -> torch.Tensor:
        return self.executor.forward(batch, kv)

    def report(self) -> dict[str, Any]:
        return {"target": self.target, "device": str(self.device), "kernels": self.kernels,
                "ops": self.executor.kernel_report()}


def lower_graph(model, directory: Path, target: str, kernels: str, device: str) -> dict[str, Any]:
    """The lowering of a graph backend: the packed weights (engine.write_weights), and the kernel set
    each op will run with."""
    from llmc.engine import write_weights
    from llmc.kernels import kernel_for

    write_weights(model, directory)
    return {"device": device, "kernels": kernels,
            "ops": {n.op: kernel_for(n.op, kernels).impl for n in model.graph.nodes}}
