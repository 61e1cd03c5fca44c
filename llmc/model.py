"""The Model: graph, weights, tokenizer and architecture of a checkpoint or an engine, and
`load_checkpoint`, which builds one from a Hugging Face checkpoint directory (engines: llmc.engine;
either: llmc.loader.load_model).

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
from llmc.checkpoint import (DTYPES as STORED_DTYPES, FLOAT_DTYPES, WeightStore, check_model_files, read_json,
                             short_repr)
from llmc.decoder import build_decoder_graph
from llmc.errors import GraphError, ModelFormatError
from llmc.ir import OPS, Graph, verify
from llmc.targets import DEFAULT_TARGET
from llmc.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # `compile --dtype`
QUANTIZED_WEIGHT_OPS = ("embed", "linear", "qkv_linear", "gate_up_silu", "logits")   # kernels take a QuantizedWeight


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

    @property
    def target(self) -> str:
        """The target that runs it: the engine's, or the default one for a checkpoint."""
        return self.manifest["target"] if self.manifest is not None else DEFAULT_TARGET

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


def load_checkpoint(p: Path, passes: tuple[str, ...] | None = None) -> Model:
    from llmc.passes import DEFAULT_PIPELINE, PassManager

    check_model_files(p)
    cfg = read_json(p / "config.json", "config.json")
    arch = parse_arch(cfg)
    store = WeightStore.open(p)
    quantization = cfg.get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        raise ModelFormatError(f"{p / 'config.json'}: quantization_config is {short_repr(quantization)}, "
                               "not an object")
    if quantization is not None and quantization.get("quant_method") == "gptq":
        from llmc.gptq_format import GptqStore
        store = GptqStore(store, quantization)
        quantization = store.summary()          # in llmc's terms (recipe, provenance), as engines record it
    elif quantization is not None:
        from llmc.quantized.store import QuantizedStore, entries_from_manifest
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
    if kv_cache_format(quantization, f"{p / 'config.json'}") and "kv-cache-scales" not in pipeline:
        from llmc.passes.kv_cache import kv_scale_names
        pipeline += ("kv-cache-scales",)
        shapes.update({w: store.shape(w) for i in range(arch.num_layers) for w in kv_scale_names(i) if w in store})
    graph, records = PassManager(pipeline).run(graph, shapes)
    check_weight_types(graph, store)
    return Model(path=p, kind="hf", arch=arch, graph=graph, weights=store, tokenizer=Tokenizer(p),
                 passes=records, quantization=quantization_summary(quantization))


def check_weight_types(graph: Graph, store: Any, error: type = ModelFormatError) -> None:
    """Every weight the graph reads is stored as its op can use it (from the headers; no data is
    read): a float tensor, or a quantized weight where the op's kernels take one (the linears); the
    matrices a fused op stacks (qkv_linear, gate_up_silu) all quantized alike or none."""
    fmt_of = getattr(store, "quantized_format", store.dtype)
    for n in graph.nodes:
        weights = n.inputs[OPS[n.op].num_values:]
        for w in weights:
            dtype = store.dtype(w)
            if dtype in FLOAT_DTYPES or (dtype not in STORED_DTYPES and n.op in QUANTIZED_WEIGHT_OPS):
                continue
            what = f"is stored as {dtype}" if dtype in STORED_DTYPES else f"is quantized ({dtype})"
            raise error(f"{_file_of(store, w)}: weight {w!r} {what}, but {n.op} reads a float weight "
                        f"({', '.join(FLOAT_DTYPES)})")
        matrices = [w for w in weights if len(store.shape(w)) == 2]
        quantized = [w for w in matrices if store.dtype(w) not in STORED_DTYPES]
        formats = {fmt_of(w) for w in quantized}       # (weight, input format), or a format key
        stackable = all(not isinstance(f, tuple) or f[0].granularity in ("channel", "group") for f in formats)
        if len(matrices) > 1 and quantized and (quantized != matrices or len(formats) > 1 or not stackable):
            kinds = ", ".join(f"{w} {_describe(fmt_of(w)) if w in quantized else store.dtype(w)}" for w in matrices)
            raise error(f"{_file_of(store, matrices[0])}: {n.op} stacks weights that must be quantized alike "
                        f"(one channel- or group-wise format) or not at all: {kinds}")


def _describe(fmt: Any) -> str:
    if not isinstance(fmt, tuple):
        return str(fmt)
    w, act = fmt
    group = f" (group {w.group_size})" if w.group_size is not None else ""
    return f"{w.key}{group}" + ("" if act is None else f" + {act.key} inputs")


def _file_of(store: Any, name: str) -> Path | str:
    """The file holding a weight (a quantized one's qdata), for messages."""
    base = getattr(store, "base", store)
    if not isinstance(base, WeightStore):
        return "the checkpoint"
    return base.files.get(name) or base.files.get(f"{name}.qdata") or "the checkpoint"


def kv_cache_format(quantization: dict[str, Any] | None, where: str = "the model") -> dict[str, Any] | None:
    """The recipe's quantized KV-cache format (TensorQuant as a dict), or None. A malformed one
    (a recipe or kv_cache that is not an object, an unknown dtype) is a ModelFormatError."""
    recipe = (quantization or {}).get("recipe")
    if recipe is None:
        return None
    if not isinstance(recipe, dict):
        raise ModelFormatError(f"{where}: the quantization recipe is {short_repr(recipe)}, not an object")
    kv = recipe.get("kv_cache")
    if kv is None:
        return None
    from llmc.kernels.reference.kv_quant import KV_DTYPES
    if not isinstance(kv, dict) or not isinstance(kv.get("dtype"), str) or kv["dtype"] not in KV_DTYPES:
        raise ModelFormatError(f"{where}: the quantization recipe's kv_cache is {short_repr(kv)}, not a "
                               f"KV-cache format with a dtype of {', '.join(KV_DTYPES)}")
    return kv


def quantization_summary(q: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a model's quantization is, without the per-weight table."""
    return None if q is None else {k: v for k, v in q.items() if k != "weights"}
