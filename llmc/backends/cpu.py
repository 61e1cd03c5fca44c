"""The cpu target, the default: the engine's graph runs from `weights.safetensors` (quantized weights
stay packed) with the `cpu` kernel set (or `reference`, the specification) on the CPU."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.backends import GraphBackend, lower_graph
from llmc.kernels.cpu import native
from llmc.targets import Target, register_target

NAME = "cpu"


def lower(model, directory: Path) -> dict[str, Any]:
    status = native.status()
    return {**lower_graph(model, directory, NAME, kernels="cpu", device="cpu"),
            "native_gemv": "available" if status["native_gemm"] else f"unavailable ({status['error']})"}


def load(model, runtime) -> GraphBackend:
    return GraphBackend(model, NAME, runtime.kernels or "cpu", runtime.device)


register_target(Target(NAME, "torch CPU kernels (native int8/int4 GEMV, SDPA attention, fused matmuls)",
                       devices=("cpu",), kernel_sets=("cpu", "reference"), lower=lower, load=load))
