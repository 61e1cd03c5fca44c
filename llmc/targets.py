"""Targets, registered by name: what `compile` lowers a model to and what runs the engine.

A target has two halves:
- `lower(model, directory) -> dict`: at compile, writes the artifact files the target runs from into
  the engine directory being built and returns the manifest's `backend` section (device, kernel
  set, the kernel each op will run);
- `load(model, runtime) -> Backend`: at run time, turns a loaded engine (or a checkpoint, which runs
  on the default target) into the object the runtime drives;
- optionally `check()`: raises, before any work, when this machine lacks what compiling needs (a
  package, a GPU), and `describe(engine_dir) -> str`: its artifact as text, which `--dump-ir` writes.

A `Backend` has a device, a KV-cache layout (`allocate_kv`), its batch preparation and
`forward(batch, kv) -> logits`; `report()` says what ran. Adding a target is one module that calls
`register_target` and one line in `BUILTIN` (or an import of that module, for a plugin).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from llmc.errors import ConfigError
from llmc.registry import Registry

DEFAULT_TARGET = "cpu"
BUILTIN = ("llmc.backends.cpu", "llmc.backends.onnx", "llmc.backends.tensorrt",   # register the built-in
           "llmc.backends.triton")                                                # targets
PLANNED: tuple[str, ...] = ()                             # in the design, not yet in this version


class Backend(Protocol):
    target: str
    device: Any                                           # torch.device
    kernels: str                                          # the kernel set it runs
    kv_spec: Any                                          # KVCacheSpec: what one token's keys and values cost

    def allocate_kv(self, num_blocks: int, block_size: int) -> Any: ...   # a PagedKVCache in its layout
    def forward(self, batch: Any, kv: Any) -> Any: ...                    # RaggedBatch, cache -> logits
    def report(self) -> dict[str, Any]: ...                               # backend, device, kernels, ops


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    devices: tuple[str, ...]                              # device types it runs on
    kernel_sets: tuple[str, ...]                          # the first is the default
    lower: Callable[[Any, Path], dict[str, Any]]          # (model, engine tmp dir) -> manifest "backend"
    load: Callable[[Any, Any], Backend]                   # (model, RuntimeConfig) -> Backend
    check: Callable[[], None] | None = None               # raises what this machine lacks to compile for it
    describe: Callable[[Path], str] | None = None         # the lowered artifact as text (for --dump-ir)


TARGETS: Registry[Target] = Registry("target")


def register_target(t: Target) -> Target:
    return TARGETS.add(t.name, t)


def unregister_target(name: str) -> None:
    TARGETS.pop(name, None)


def _load_builtin() -> None:
    for module in BUILTIN:                                # deliberate registration import
        importlib.import_module(module)


def available_targets() -> list[str]:
    _load_builtin()
    return list(TARGETS)


def get_target(name: str) -> Target:
    _load_builtin()
    if name in TARGETS:
        return TARGETS[name]
    if name in PLANNED:
        raise ConfigError(f"target {name!r} is not available in this version of llmc",
                          hint=f"available: {', '.join(TARGETS)}")
    raise ConfigError(f"unknown target {name!r}", hint=f"available: {', '.join(TARGETS)}")


def open_backend(model, runtime) -> Backend:
    """The backend that runs `model` (an engine: its manifest's target; a checkpoint: the default
    target) with the runtime's kernel set and device, each checked against what the target runs."""
    t = get_target(model.target)
    kernels = runtime.kernels or t.kernel_sets[0]
    if kernels not in t.kernel_sets:
        raise ConfigError(f"target {t.name} runs the kernel sets {', '.join(t.kernel_sets)}, not {kernels!r}")
    device = runtime.device.split(":")[0]
    if device not in t.devices:
        raise ConfigError(f"target {t.name} runs on {', '.join(t.devices)}, not {runtime.device!r}")
    return t.load(model, runtime)
