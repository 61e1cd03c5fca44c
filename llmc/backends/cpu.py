"""The cpu target, the default: the engine's graph runs from `weights.safetensors` (quantized weights
stay packed) on the CPU, with `native` (the whole step in one native call: llmc.backends.native; the
default for every model it runs), the `cpu` kernel set (torch and native GEMVs, op by op: the default
for the rest), or `reference` (the specification)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.backends import GraphBackend, lower_graph
from llmc.kernels.cpu import native
from llmc.targets import Target, register_target

NAME = "cpu"


def lower(model, directory: Path) -> dict[str, Any]:
    """The packed weights; the manifest records the kernel set the engine runs by default."""
    status = native.status()
    section = lower_graph(model, directory, NAME, kernels="cpu", device="cpu")
    if default_kernels(model) == "native":
        section.update(kernels="native", ops={op: "native" for op in section["ops"]})
    return {**section, "native_gemv": "available" if status["native_gemm"] else f"unavailable ({status['error']})",
            "artifact": "weights.safetensors",
            "requires": "a CPU; llmc's native kernels are built with the system's C compiler on first use "
                        "(without one, torch kernels run)"}


def default_kernels(model, device: str = "cpu") -> str:
    """native (one native call per step) for every model it runs, else cpu."""
    from llmc.backends.native import unsupported
    return "native" if device.split(":")[0] == "cpu" and unsupported(model) is None else "cpu"


def load(model, runtime):
    kernels = runtime.kernels or default_kernels(model, runtime.device)
    if kernels == "native":
        from llmc.backends.native import NativeBackend
        return NativeBackend(model, NAME, runtime.device, capacity=runtime.max_batched_tokens)
    return GraphBackend(model, NAME, kernels, runtime.device)


register_target(Target(NAME, "CPU: the whole step in native code (fp32/bf16/fp16, int8, int4, w8a8, w4a8), or torch "
                       "kernels op by op",
                       devices=("cpu",), kernel_sets=("cpu", "reference", "native"), lower=lower, load=load))
