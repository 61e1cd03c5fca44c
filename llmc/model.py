"""`load_model(PATH)`: a Hugging Face checkpoint directory or an engine directory, as one Model.

A checkpoint is turned into a Graph by the decoder builder and then run through the default pass
pipeline, exactly as `compile` would, so that generating from the checkpoint and from its engine
runs the same graph with the same kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmc.arch import ArchConfig, parse_arch
from llmc.checkpoint import WeightStore, read_json
from llmc.decoder import build_decoder_graph
from llmc.errors import GraphError, ModelFormatError
from llmc.ir import Graph, verify
from llmc.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Model:
    path: Path
    kind: str                                  # "hf" | "engine"
    arch: ArchConfig
    graph: Graph
    weights: WeightStore
    tokenizer: Tokenizer
    dtype: torch.dtype = torch.float32         # compute dtype
    passes: list[Any] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None   # recipe and provenance of a quantized model

    def executor(self, kernels: str = "cpu"):
        from llmc.runtime.executor import Executor
        return Executor(self.graph, self.weights.get, kernels=kernels, dtype=self.dtype)

    @property
    def kv_dtype(self) -> torch.dtype:
        """What the paged KV cache stores: the compute dtype, or the recipe's quantized KV format."""
        kv = kv_cache_format(self.quantization)
        if kv is None:
            return self.dtype
        from llmc.kernels.reference.kv_quant import KV_DTYPES
        return KV_DTYPES[kv["dtype"]]

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {w: self.weights.shape(w) for w in self.graph.weight_names()}


def check_path(path: Path | str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise ModelFormatError(f"{p}: is a file, not a model directory",
                               hint="pass a Hugging Face checkpoint directory or an llmc engine directory")
    return p


def load_model(path: Path | str, passes: tuple[str, ...] | None = None) -> Model:
    """Load a checkpoint or engine directory. `passes` (checkpoints only) overrides the default pipeline."""
    p = check_path(path)
    from llmc.engine import ENGINE_FILE, load_engine
    if (p / ENGINE_FILE).exists():
        return load_engine(p)
    if (p / "config.json").exists():
        return load_checkpoint(p, passes)
    raise ModelFormatError(f"{p}: not a model directory (no config.json or engine.json)")


def load_checkpoint(p: Path, passes: tuple[str, ...] | None = None) -> Model:
    from llmc.passes import DEFAULT_PIPELINE, PassManager

    cfg = read_json(p / "config.json", "config.json")
    arch = parse_arch(cfg)
    store = WeightStore.open(p)
    quantization = cfg.get("quantization_config")
    if quantization is not None and quantization.get("quant_method") == "gptq":
        from llmc.passes.quant.gptq_format import GptqStore
        store = GptqStore(store, quantization)
        quantization = store.summary()          # in llmc's terms (recipe, provenance), as engines record it
    elif quantization is not None:
        from llmc.passes.quant.store import QuantizedStore, entries_from_manifest
        store = QuantizedStore(store, entries_from_manifest(quantization, f"{p / 'config.json'}"))
    graph = build_decoder_graph(arch)
    missing = [w for w in graph.weight_names() if w not in store]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelFormatError(f"{p}: the checkpoint lacks the tensor {missing[0]!r}{more}")
    shapes = {w: store.shape(w) for w in graph.weight_names()}
    try:
        verify(graph, shapes)
    except GraphError as e:
        raise ModelFormatError(f"{p}: tensor shapes do not match config.json: {e}") from None
    pipeline = tuple(DEFAULT_PIPELINE if passes is None else passes)
    if kv_cache_format(quantization) and "kv-cache-scales" not in pipeline:
        from llmc.passes.kv_cache import kv_scale_names
        pipeline += ("kv-cache-scales",)
        shapes.update({w: store.shape(w) for i in range(arch.num_layers) for w in kv_scale_names(i) if w in store})
    graph, records = PassManager(pipeline).run(graph, shapes)
    return Model(path=p, kind="hf", arch=arch, graph=graph, weights=store, tokenizer=Tokenizer(p),
                 passes=records, quantization=_summary(quantization))


def kv_cache_format(quantization: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recipe's quantized KV-cache format (TensorQuant as a dict), or None."""
    return ((quantization or {}).get("recipe") or {}).get("kv_cache")


def _summary(q: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a model's quantization is, without the per-weight table."""
    return None if q is None else {k: v for k, v in q.items() if k != "weights"}
