"""`quantize`: a Hugging Face checkpoint -> a quantized checkpoint directory (atomic write).

Weights are read lazily and written one decoder layer per safetensors shard, so memory holds one
layer at a time. Algorithms are registered by name with the schemes they serve; every linear
weight of the decoder (but the `skip` patterns) is quantized in the scheme's weight format, and
the per-layer error (SQNR of the dequantized weights) is reported.
"""
from __future__ import annotations

import fnmatch
import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from llmc import __version__
from llmc.arch import parse_arch
from llmc.checkpoint import INDEX_FILE, WeightStore, read_json
from llmc.decoder import build_decoder_graph
from llmc.errors import ConfigError
from llmc.io import atomic_directory, write_json_atomic
from llmc.passes.quant.formats import QuantizedWeight, dequantize, quantize
from llmc.passes.quant.scheme import QuantRecipe, TensorQuant
from llmc.passes.quant.store import QuantizedEntry, manifest_section
from llmc.tokenizer import TOKENIZER_FILES

Algorithm = Callable[[torch.Tensor, TensorQuant, str], QuantizedWeight]


@dataclass(frozen=True)
class AlgorithmSpec:
    fn: Algorithm
    schemes: tuple[str, ...]             # schemes this algorithm can produce


ALGORITHMS: dict[str, AlgorithmSpec] = {}
PLANNED_ALGORITHMS = ("gptq", "awq", "smoothquant")


def register_algorithm(name: str, schemes: tuple[str, ...]):
    def add(fn: Algorithm) -> Algorithm:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice")
        ALGORITHMS[name] = AlgorithmSpec(fn, schemes)
        return fn
    return add


@register_algorithm("rtn", schemes=("w8a16", "w4a16"))
def rtn(w: torch.Tensor, fmt: TensorQuant, name: str) -> QuantizedWeight:
    """Round to nearest: each weight on its own, no calibration."""
    return quantize(w, fmt, name)


def check_recipe(recipe: QuantRecipe) -> AlgorithmSpec:
    algo, scheme = recipe.algorithm, recipe.scheme.name
    if algo in PLANNED_ALGORITHMS and algo not in ALGORITHMS:
        raise ConfigError(f"algorithm {algo!r} is not available in this version of llmc",
                          hint=f"available: {', '.join(ALGORITHMS)}")
    spec = ALGORITHMS.get(algo)
    if spec is None:
        raise ConfigError(f"unknown algorithm {algo!r}; known: {', '.join(ALGORITHMS)}")
    if scheme not in spec.schemes:
        raise ConfigError(f"algorithm {algo!r} does not produce scheme {scheme!r}",
                          hint=f"{algo} serves: {', '.join(spec.schemes)}")
    if recipe.kv_cache is not None:
        raise ConfigError("KV-cache quantization is not available in this version of llmc")
    return spec


@dataclass(frozen=True)
class LayerReport:
    layer: str                          # "0", "1", ... or "other"
    quantized: int                      # weights quantized in it
    sqnr_db_min: float | None           # worst weight's SQNR (dequantized vs original)
    sqnr_db_mean: float | None
    seconds: float


@dataclass(frozen=True)
class QuantizeResult:
    output: str
    source: str
    recipe: dict[str, Any]
    layers: list[LayerReport]
    seconds: float
    peak_rss_bytes: int
    bytes_in: int
    bytes_out: int
    skipped: list[str] = field(default_factory=list)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def _linear_weights(arch) -> list[str]:
    """Weights the decoder reads through `linear` (slot 0), in graph order."""
    return [n.inputs[1] for n in build_decoder_graph(arch).nodes if n.op == "linear"]


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[2] if name.startswith("model.layers.") else "other"


def quantize_checkpoint(model: Path | str, out: Path | str, recipe: QuantRecipe, force: bool = False,
                        allow_requantize: bool = False,
                        on_layer: Callable[[LayerReport, int], None] | None = None) -> QuantizeResult:
    from llmc.model import check_path

    t0 = time.perf_counter()
    src, out = check_path(model), Path(out)
    spec = check_recipe(recipe)
    cfg = read_json(src / "config.json", "config.json")
    if "quantization_config" in cfg and not allow_requantize:
        raise ConfigError(f"{src} is already quantized ({cfg['quantization_config'].get('quant_method')})",
                          hint="quantize the original checkpoint")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists", hint="pass --force to replace it")
    arch = parse_arch(cfg)
    store = WeightStore.open(src)
    graph = build_decoder_graph(arch)
    wanted = set(_linear_weights(arch))
    skip = [n for n in graph.weight_names() if n in wanted and any(fnmatch.fnmatch(n, p) for p in recipe.scheme.skip)]
    missing = [n for n in graph.weight_names() if n not in store]
    if missing:
        raise ConfigError(f"{src}: the checkpoint lacks the tensor {missing[0]!r}")
    groups: dict[str, list[str]] = {}
    for name in graph.weight_names():
        groups.setdefault(_layer_of(name), []).append(name)
    entries: dict[str, QuantizedEntry] = {}
    reports, weight_map = [], {}
    with atomic_directory(out, overwrite=force) as tmp:
        for i, (layer, names) in enumerate(groups.items()):
            t1 = time.perf_counter()
            tensors, sqnrs = {}, []
            for name in names:
                w = store.get(name)
                if name in wanted and name not in skip:
                    qw = spec.fn(w, recipe.scheme.weight, name)
                    sqnrs.append(sqnr_db(w.float(), dequantize(qw)))
                    tensors.update(qw.tensors(name))
                    entries[name] = QuantizedEntry(qw.fmt, qw.shape)
                else:
                    tensors[name] = w.contiguous()
            shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(tmp / shard), metadata={"format": "pt", "producer": f"llmc {__version__}"})
            weight_map.update({k: shard for k in tensors})
            del tensors
            finite = [s for s in sqnrs if s != float("inf")]
            report = LayerReport(layer, len(sqnrs), min(finite) if finite else None,
                                 sum(finite) / len(finite) if finite else None, time.perf_counter() - t1)
            reports.append(report)
            if on_layer is not None:
                on_layer(report, len(groups))
        write_json_atomic(tmp / INDEX_FILE, {"metadata": {"producer": f"llmc {__version__}"},
                                             "weight_map": weight_map})
        qcfg = manifest_section(entries, recipe=recipe.to_dict(), llmc_version=__version__,
                                source=str(src), skipped=skip)
        write_json_atomic(tmp / "config.json", {**cfg, "quantization_config": qcfg})
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
    bytes_out = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return QuantizeResult(output=str(out), source=str(src), recipe=recipe.to_dict(), layers=reports,
                          seconds=time.perf_counter() - t0,
                          peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          bytes_in=store.nbytes(), bytes_out=bytes_out, skipped=skip)


def result_to_json(r: QuantizeResult) -> str:
    return json.dumps(asdict(r), indent=2)
