"""Kernels, grouped in kernel sets: `reference` (plain, readable torch: the specification) and `cpu`
(the fast path); a backend runs a graph with one set. Each set registers an implementation of every
op; a missing one raises, never falls back silently.

A kernel is `fn(ctx, *values, *weights, **attrs)`, where `ctx` is a `KernelContext`: the step's
ragged batch and paged KV cache, what the set's `prepare_batch` hook built for the batch once per
step (the cpu set's attention plan), and a per-step scratch dict. An optional `prepare` turns a
node's weights into the tensors `fn` wants once, when the executor is built (e.g. concatenating the
q, k and v weights of a fused node). A kernel that picks among variants (a native GEMV or torch's
GEMM) says which one ran with `ctx.note(variant)`, so a run can report what really executed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from llmc.errors import ConfigError
from llmc.registry import Registry


@dataclass(frozen=True)
class Kernel:
    op: str
    impl: str                                  # the kernel set it belongs to
    fn: Callable[..., Any]
    prepare: Callable[..., tuple[Any, ...]] | None = None


@dataclass
class KernelSet:
    name: str
    description: str
    prepare_batch: Callable[[Any], Any] | None = None     # batch -> per-step state for ctx.prepared
    kernels: Registry[Kernel] = field(default_factory=lambda: Registry("kernel for op"))


@dataclass
class KernelContext:
    """What a kernel sees of the step besides its values and weights."""
    batch: Any = None                          # the ragged batch (llmc.runtime.batch.RaggedBatch)
    kv: Any = None                             # the paged KV cache (llmc.runtime.kv_cache.PagedKVCache)
    prepared: Any = None                       # the kernel set's prepare_batch(batch)
    scratch: dict[Any, Any] = field(default_factory=dict)     # per-step memo shared by kernels
    used: Counter | None = None                # (op, variant) -> calls, when the caller records them
    op: str = ""                               # the op running now

    def note(self, variant: str) -> None:
        if self.used is not None:
            self.used[self.op, variant] += 1


def context(kernel_set: str, batch: Any = None, kv: Any = None, used: Counter | None = None) -> KernelContext:
    """A step's context for `kernel_set`, its prepare_batch hook run on `batch`."""
    hook = get_kernel_set(kernel_set).prepare_batch
    prepared = hook(batch) if hook is not None and batch is not None else None
    return KernelContext(batch, kv, prepared, used=used)


KERNEL_SETS: Registry[KernelSet] = Registry("kernel set")


def register_kernel_set(name: str, description: str, prepare_batch: Callable[[Any], Any] | None = None) -> KernelSet:
    return KERNEL_SETS.add(name, KernelSet(name, description, prepare_batch, Registry(f"{name} kernel for op")))


def register_kernel(op: str, impl: str, prepare: Callable[..., tuple[Any, ...]] | None = None):
    return KERNEL_SETS[impl].kernels.decorator(op, lambda fn: Kernel(op, impl, fn, prepare))


def get_kernel_set(name: str) -> KernelSet:
    if name not in KERNEL_SETS:
        raise ConfigError(f"unknown kernel set {name!r}", hint=f"choose one of {', '.join(KERNEL_SETS)}")
    return KERNEL_SETS[name]


def kernel_for(op: str, impl: str) -> Kernel:
    try:
        return get_kernel_set(impl).kernels[op]
    except KeyError:
        raise ConfigError(f"no {impl} kernel for op {op!r}") from None


from llmc.kernels import reference as _reference  # noqa: E402,F401  (registers)
from llmc.kernels import cpu as _cpu  # noqa: E402,F401  (registers)
