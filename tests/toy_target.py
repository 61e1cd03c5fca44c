"""A toy target, to show that adding a target is one module and one registration: the reference
kernels, run as a target of their own. Importing this module registers it (tests unregister it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.backends import GraphBackend, lower_graph
from llmc.targets import Target, register_target

NAME = "toy-reference"


def lower(model, directory: Path) -> dict[str, Any]:
    return lower_graph(model, directory, NAME, kernels="reference", device="cpu")


def load(model, runtime) -> GraphBackend:
    return GraphBackend(model, NAME, runtime.kernels or "reference", runtime.device)


TARGET = register_target(Target(NAME, "the reference kernels as a target (tests only)", devices=("cpu",),
                                kernel_sets=("reference",), lower=lower, load=load))
