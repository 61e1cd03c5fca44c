"""The executor: runs a Graph over a ragged batch with one kernel set on one device.
`forward(batch, kv) -> logits`.

Built once per model: every node is bound to its kernel and its (prepared) weights, moved to the
device, and the last use of every value is known, so intermediate tensors are released as soon as
they are dead. Each step runs the kernel set's batch-preparation hook once, and counts which
variant of each op's kernel ran (`kernel_report`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from llmc.ir import OPS, Graph, verify
from llmc.kernels import context, get_kernel_set, kernel_for
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.kv_cache import PagedKVCache


@dataclass(frozen=True)
class _Step:
    op: str
    fn: Callable[..., Any]
    values: tuple[str, ...]
    weights: tuple[Any, ...]
    attrs: dict[str, Any]
    outputs: tuple[str, ...]
    release: tuple[str, ...]          # values whose last use is this step


class Executor:
    def __init__(self, graph: Graph, load_weight: Callable[[str], Any], kernels: str = "cpu",
                 dtype: torch.dtype = torch.float32, input_shapes: dict | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.graph, self.kernels, self.dtype, self.device = graph, kernels, dtype, torch.device(device)
        get_kernel_set(kernels)                         # an unknown set is a clear error, before any work
        cache: dict[str, Any] = {}

        def weight(name: str) -> Any:
            if name not in cache:                       # tied weights are loaded once
                t = load_weight(name)
                floating = isinstance(t, torch.Tensor) and t.is_floating_point()
                t = t.to(dtype) if floating else t      # quantized weights stay packed
                cache[name] = t.to(self.device) if isinstance(t, torch.Tensor) else t.to_device(self.device)
            return cache[name]

        verify(graph, {name: tuple(weight(name).shape) for name in graph.weight_names()}, input_shapes)
        last_use: dict[str, int] = {}
        for i, n in enumerate(graph.nodes):
            for v in n.inputs[: OPS[n.op].num_values]:
                last_use[v] = i
        keep = set(graph.outputs)
        steps = []
        for i, n in enumerate(graph.nodes):
            spec, k = OPS[n.op], kernel_for(n.op, kernels)
            wts = tuple(weight(w) for w in n.inputs[spec.num_values:])
            attrs = n.attr_dict
            if k.prepare is not None:
                wts = k.prepare(wts, attrs)
            values = n.inputs[: spec.num_values]
            release = tuple(v for v in set(values) if last_use[v] == i and v not in keep)
            steps.append(_Step(n.op, k.fn, values, wts, attrs, n.outputs, release))
        self._steps = steps
        self._used: Counter = Counter()              # (op, variant) -> calls, over every step run

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch, kv: PagedKVCache) -> Tensor:
        """Logits [num_seqs, vocab] for each sequence's last token, or [tokens, vocab] when
        `batch.all_logits`."""
        return self.run(batch, kv)[self.graph.outputs[0]]

    @torch.inference_mode()
    def run(self, batch: RaggedBatch, kv: PagedKVCache, inputs: dict[str, Tensor] | None = None,
            capture: tuple[str, ...] = ()) -> dict[str, Tensor]:
        """The graph outputs and the `capture`d values. `inputs` supplies graph inputs other than
        `tokens` and `positions` (a single layer's subgraph takes the hidden state)."""
        env: dict[str, Tensor] = {"tokens": batch.tokens, "positions": batch.positions, **(inputs or {})}
        ctx = context(self.kernels, batch, kv, self._used)
        kept: dict[str, Tensor] = {}
        for s in self._steps:
            ctx.op = s.op
            out = s.fn(ctx, *[env[v] for v in s.values], *s.weights, **s.attrs)
            if len(s.outputs) == 1:
                env[s.outputs[0]] = out
            else:
                env.update(zip(s.outputs, out))
            for v in s.outputs:
                if v in capture:
                    kept[v] = env[v]
            for v in s.release:
                del env[v]
        return {**{o: env[o] for o in self.graph.outputs}, **kept}

    def kernel_report(self) -> dict[str, dict[str, Any]]:
        """Per op of the graph: the kernel set that ran it and, for kernels with variants (native or
        fallback), how many calls each variant served so far."""
        report: dict[str, dict[str, Any]] = {}
        for s in self._steps:
            report.setdefault(s.op, {"kernels": self.kernels, "variants": {}})
        for (op, variant), calls in sorted(self._used.items()):
            report[op]["variants"][variant] = calls
        return report
