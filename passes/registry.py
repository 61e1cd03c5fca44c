"""The pass registry and the PassManager that runs an ordered list, verifying after each pass."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from llmc.errors import ConfigError
from llmc.ir import Graph, Shape, format_graph, verify
from llmc.registry import Registry


@dataclass(frozen=True)
class NoConfig:
    pass


PassFn = Callable[[Graph, Any], Graph]
PASSES: Registry[tuple[PassFn, type]] = Registry("pass")


def register_pass(name: str, config: type = NoConfig) -> Callable[[PassFn], PassFn]:
    return PASSES.decorator(name, lambda fn: (fn, config))


@dataclass(frozen=True)
class PassRecord:
    name: str
    config: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int


class PassManager:
    """Runs passes in order; verifies the graph after each; times and records each run."""

    def __init__(self, names: tuple[str, ...] | list[str], configs: Mapping[str, Any] | None = None) -> None:
        unknown = [n for n in names if n not in PASSES]
        if unknown:
            raise ConfigError(f"unknown pass {unknown[0]!r}", hint=f"known passes: {', '.join(sorted(PASSES))}")
        configs = dict(configs or {})
        self.pipeline = [(n, PASSES[n][0], configs.get(n, PASSES[n][1]())) for n in names]

    def run(self, g: Graph, weight_shapes: Mapping[str, Shape] | None = None,
            dump_dir: Path | None = None) -> tuple[Graph, list[PassRecord]]:
        records: list[PassRecord] = []
        verify(g, weight_shapes)
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
            (dump_dir / "00-input.txt").write_text(format_graph(g))
        for i, (name, fn, cfg) in enumerate(self.pipeline, start=1):
            t0 = time.perf_counter()
            out = fn(g, cfg)
            shapes = verify(out, weight_shapes)
            seconds = time.perf_counter() - t0
            records.append(PassRecord(name, asdict(cfg), seconds, len(g.nodes), len(out.nodes)))
            if dump_dir is not None:
                (dump_dir / f"{i:02d}-{name}.txt").write_text(format_graph(out, shapes))
            g = out
        return g, records
