"""The triton target: the engine's graph runs op by op with the `triton` kernel set (kernels/triton/) on
an NVIDIA GPU, from the same `weights.safetensors` as the cpu target (quantized weights stay packed and
are dequantized inside the kernels).

Compiling for it needs neither triton nor a GPU: the lowering writes the weights and the manifest,
which records what running it requires and the triton version at compile time, when one is installed.
Running it needs both; on the CPU it runs only under TRITON_INTERPRET=1 (Triton's interpreter, slow:
for verifying the kernels, as the tests do), and it says so in one line otherwise."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmc.backends import GraphBackend, lower_graph
from llmc.errors import ConfigError
from llmc.kernels.triton import lazy
from llmc.targets import Target, register_target

NAME = "triton"
KERNELS = "triton"
REQUIRES = (f"an NVIDIA GPU (CUDA) and {lazy.PACKAGE} ({lazy.INSTALL_HINT}); on CPU only under TRITON_INTERPRET=1, "
            "for verification")


def lower(model, directory: Path) -> dict[str, Any]:
    """The packed weights; the manifest records the kernel set, what running it requires and the
    triton version installed when it was compiled (None: none was)."""
    section = lower_graph(model, directory, NAME, kernels=KERNELS, device="cuda")
    return {**section, "triton": lazy.version(), "artifact": "weights.safetensors", "requires": REQUIRES}


def check_device(device: str) -> None:
    """Raise ConfigError unless the triton kernels can run on `device` here."""
    kind = torch.device(device).type
    if kind == "cpu" and not lazy.interpreter_requested():
        raise ConfigError("the triton target runs on an NVIDIA GPU; on CPU only under TRITON_INTERPRET=1, "
                          "for verification", hint="run it with --device cuda, or compile for --target cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("the triton target needs a CUDA GPU, and torch sees none (torch.cuda.is_available() "
                          "is False)", hint="install a CUDA build of torch on a machine with an NVIDIA GPU")


def load(model, runtime) -> GraphBackend:
    check_device(runtime.device)
    lazy.require_triton()                           # a missing package is an error now, not at the first step
    return GraphBackend(model, NAME, runtime.kernels or KERNELS, runtime.device)


register_target(Target(NAME, "NVIDIA GPU: Triton kernels op by op (fp32/bf16/fp16, int8, int4, fp8, w8a8, w4a8, "
                       "int8/fp8 KV cache); on CPU only under TRITON_INTERPRET=1",
                       devices=("cuda", "cpu"), kernel_sets=(KERNELS,), lower=lower, load=load))
