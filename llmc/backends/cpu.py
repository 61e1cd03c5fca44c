"""The cpu target, the default: the engine's graph runs from `weights.safetensors` (quantized weights
stay packed) on the CPU, with the `cpu` kernel set, `reference` (the specification), or `native`
(the whole step in one native call: llmc.backends.native)."""
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


def load(model, runtime):
    kernels = runtime.kernels or "cpu"
    if kernels == "native":
        from llmc.backends.native import NativeBackend
        return NativeBackend(model, NAME, runtime.device, capacity=runtime.max_batched_tokens)
    return GraphBackend(model, NAME, kernels, runtime.device)


register_target(Target(NAME, "torch CPU kernels (native int8/int4 GEMV, SDPA attention, fused matmuls)",
                       devices=("cpu",), kernel_sets=("cpu", "reference", "native"), lower=lower, load=load))
