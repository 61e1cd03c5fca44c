"""`compile`: checkpoint -> graph -> passes -> the target's lowering -> engine directory."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.errors import ConfigError
from llmc.io import atomic_directory, check_output
from llmc.ir import format_graph
from llmc.targets import DEFAULT_TARGET, get_target


@dataclass(frozen=True)
class CompileResult:
    engine: str
    target: str
    source: str
    seconds: float
    nodes: int
    passes: list[dict[str, Any]]
    files: dict[str, dict[str, Any]]
    backend: dict[str, Any]                 # the target's manifest section: device, kernel set, kernels by op

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


def compile(model: Path | str, out: Path | str, target: str = DEFAULT_TARGET, passes: list[str] | None = None,
            dump_ir: Path | str | None = None, force: bool = False, dtype: str | None = None) -> CompileResult:
    """Compile a Hugging Face checkpoint into an engine directory at `out` (written atomically).

    `dtype` (fp32, bf16, fp16; default: the checkpoint's compute dtype, fp32) is what the engine's
    float weights are stored as and the reference and cpu kernel sets compute in; a quantized
    checkpoint's packed matrices stay packed and only its float layers change. The native executor
    reads 16-bit weights as they are and computes in fp32."""
    from llmc.checkpoint import check_path
    from llmc.engine import ENGINE_FILE, write_engine
    from llmc.model import WEIGHT_DTYPES, load_checkpoint
    from llmc.passes import PassManager

    t0 = time.perf_counter()
    src, out = check_path(model), Path(out)
    tgt = get_target(target)
    if tgt.check is not None:
        tgt.check()                         # a missing package or GPU: one line, before loading anything
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if (src / ENGINE_FILE).exists():
        raise ConfigError(f"{src} is already an engine", hint="compile the checkpoint it was made from")
    check_output(out, [src], force=force, what="engine directory")
    if dump_ir is not None:
        dump_ir = check_output(dump_ir, [src, out], force=force, what="IR dump directory")
    m = load_checkpoint(src, tuple(passes) if passes is not None else None)
    if dtype is not None:
        m.dtype = WEIGHT_DTYPES[dtype]
    manifest = write_engine(m, out, tgt.name, overwrite=force, inputs=[src])
    if dump_ir is not None:      # re-run the same pipeline, writing each stage, then what the target made of it
        from llmc.decoder import build_decoder_graph
        with atomic_directory(dump_ir, overwrite=force, inputs=[src, out]) as tmp:
            PassManager([r.name for r in m.passes]).run(build_decoder_graph(m.arch), m.weight_shapes(), tmp)
            (tmp / "final.txt").write_text(format_graph(m.graph))
            if tgt.describe is not None:
                (tmp / f"target-{tgt.name}.txt").write_text(tgt.describe(out))
    return CompileResult(engine=str(out), target=tgt.name, source=str(src), seconds=time.perf_counter() - t0,
                         nodes=len(m.graph.nodes), passes=manifest["passes"], files=manifest["files"],
                         backend=manifest["backend"])
