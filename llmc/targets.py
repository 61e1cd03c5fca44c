"""Compile targets, registered by name. A target lowers a compiled Model into the engine directory
(writing whatever artifact it runs from) and names the kernel set its runtime uses."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmc.errors import ConfigError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kernels: str                                           # kernel set the runtime uses
    lower: Callable[[Any, Path], dict[str, Any]]           # (model, engine tmp dir) -> manifest extras


TARGETS: dict[str, Target] = {}
PLANNED = ("onnx", "tensorrt", "triton")                  # in the design, not yet in this version


def register_target(t: Target) -> Target:
    if t.name in TARGETS:
        raise ValueError(f"target {t.name!r} is registered twice")
    TARGETS[t.name] = t
    return t


def get_target(name: str) -> Target:
    if name in TARGETS:
        return TARGETS[name]
    if name in PLANNED:
        raise ConfigError(f"target {name!r} is not available in this version of llmc",
                          hint=f"available: {', '.join(TARGETS)}")
    raise ConfigError(f"unknown target {name!r}", hint=f"available: {', '.join(TARGETS)}")


def _lower_cpu(model, tmp: Path) -> dict[str, Any]:
    """The CPU engine runs the graph directly from weights.safetensors with the CPU kernels."""
    return {}


register_target(Target("cpu", "torch CPU kernels (SDPA attention, fused matmuls)", "cpu", _lower_cpu))
