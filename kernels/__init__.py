"""Kernels: every op of the Graph has a `reference` implementation (plain, readable torch: the
specification) and a `cpu` implementation (the fast path). Each is registered here by
(implementation, op); a missing one raises, never falls back silently.

A kernel is `fn(ctx, *values, *weights, **attrs)`. `ctx` is the executor's context for the step
(the ragged batch, the paged KV cache and a per-step scratch dict). An optional `prepare` turns a
node's weights into the tensors `fn` wants once, when the executor is built (e.g. concatenating the
q, k and v weights of a fused node).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llmc.errors import ConfigError

IMPLEMENTATIONS = ("reference", "cpu")


@dataclass(frozen=True)
class Kernel:
    op: str
    impl: str
    fn: Callable[..., Any]
    prepare: Callable[..., tuple[Any, ...]] | None = None


KERNELS: dict[str, dict[str, Kernel]] = {impl: {} for impl in IMPLEMENTATIONS}


def register_kernel(op: str, impl: str, prepare: Callable[..., tuple[Any, ...]] | None = None):
    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        table = KERNELS[impl]
        if op in table:
            raise ValueError(f"kernel {impl}/{op} is registered twice")
        table[op] = Kernel(op, impl, fn, prepare)
        return fn
    return add


def kernel_for(op: str, impl: str) -> Kernel:
    if impl not in KERNELS:
        raise ConfigError(f"unknown kernel set {impl!r}", hint=f"choose one of {', '.join(IMPLEMENTATIONS)}")
    try:
        return KERNELS[impl][op]
    except KeyError:
        raise ConfigError(f"no {impl} kernel for op {op!r}") from None


from llmc.kernels import reference as _reference  # noqa: E402,F401  (registers)
from llmc.kernels import cpu as _cpu  # noqa: E402,F401  (registers)
