"""`llmc.quantize`: a Hugging Face checkpoint -> a quantized checkpoint directory (atomic write), in
llmc's layout or the GPTQ one. The driver: it reads the checkpoint, runs calibration (the layer
runner of llmc.calibration) and the algorithms of llmc.passes.quant.algorithms, and writes shards.

Weights are read lazily and written one decoder layer per safetensors shard, so memory holds one
layer at a time. Algorithms are registered by name with the schemes they serve; every linear
weight of the decoder (but the `skip` patterns) is quantized in the scheme's weight format, and
the per-layer error (SQNR of the dequantized weights) is reported.
"""
from __future__ import annotations

import fnmatch
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from llmc import __version__
from llmc.arch import parse_arch
from llmc.checkpoint import INDEX_FILE, TOKENIZER_FILES, WeightStore, check_model_files, check_path, read_json
from llmc.decoder import EMBED as EMBED_NAME, LM_HEAD, build_decoder_graph
from llmc.errors import ConfigError, ModelFormatError, OptionError
from llmc.allocator import peak_rss_bytes, return_large_blocks_to_system
from llmc.io import atomic_directory, check_output, temp_path, write_json_atomic
from llmc.kernels.reference.dequant import dequantize
from llmc.passes.quant.algorithms import (AlgorithmSpec, InputStats, LayerWork, attach_activation_format,
                                          calibrates, calibrates_layers, check_recipe, input_width, kv_head_scales,
                                          sqnr_db, weight_observer, with_defaults)
from llmc.paths import copy_model_file
from llmc.quantized.formats import QuantizedWeight, quantize as quantize_weight
from llmc.quantized.scheme import QuantRecipe
from llmc.quantized.store import QuantizedEntry, manifest_section



def check_model_fits(recipe: QuantRecipe, arch, shapes: dict[str, tuple[int, ...]]) -> None:
    """What only the model can tell: calibration windows within its context, groups no wider than
    its widest linear input. Checked before any work."""
    if calibrates(recipe) and recipe.calib_seqlen > arch.max_position_embeddings:
        raise OptionError("calib_seqlen", f"{recipe.calib_seqlen} tokens is longer than the model's context "
                          f"({arch.max_position_embeddings}, max_position_embeddings)",
                          hint=f"use --calib-seqlen {arch.max_position_embeddings} or less")
    g = None if recipe.mixed else recipe.scheme.weight.group_size        # a target chooses the groups
    widest = max((s[1] for s in shapes.values() if len(s) == 2), default=0)
    if g is not None and g > widest:
        raise OptionError("group_size", f"{g} is wider than every linear input of the model (the widest is "
                          f"{widest})", hint=f"use --group-size {widest} or less (a group per row)")


@dataclass(frozen=True)
class LayerReport:
    layer: str                          # "0", "1", ... or "other"
    quantized: int                      # weights quantized in it
    sqnr_db_min: float | None           # worst weight's SQNR (dequantized vs original)
    sqnr_db_mean: float | None
    seconds: float
    output_sqnr_db: float | None = None  # calibrated algorithms: the layer's output, quantized vs float


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
    calibration: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None     # --sensitivity, a target: per unit, each candidate's KL
    mixed_precision: dict[str, Any] | None = None  # a target: the format chosen per unit


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[2] if name.startswith("model.layers.") else "other"


def _mean(xs: list[float]) -> float | None:
    finite = [x for x in xs if x != float("inf")]
    return sum(finite) / len(finite) if finite else None


def quantize_checkpoint(model: Path | str, out: Path | str, recipe: QuantRecipe, force: bool = False,
                        allow_requantize: bool = False, calib: Path | str | None = None,
                        on_layer: Callable[[LayerReport, int], None] | None = None,
                        on_progress: Callable[[str, int, int], None] | None = None) -> QuantizeResult:
    """Quantize every linear of the decoder (but the scheme's `skip` patterns) with the recipe's
    algorithm; calibrated algorithms walk the layers in order on the calibration text. With
    --sensitivity or a mixed-precision target the sensitivity is measured first (`on_progress`:
    what, done, total), and a target's plan gives each weight its format."""
    from llmc.passes.kv_cache import kv_scale_names
    from llmc.calibration import LayerRunner, layer_nodes, load_calibration
    from llmc.tokenizer import Tokenizer

    t0 = time.perf_counter()
    return_large_blocks_to_system()               # calibration frees many large blocks (llmc.allocator)
    src, out = check_path(model), Path(out)
    spec = check_recipe(recipe)
    recipe = with_defaults(recipe)
    given = recipe                                  # as asked; a target's plan fills in the head and embeddings
    check_model_files(src)
    cfg = read_json(src / "config.json", "config.json")
    if not isinstance(cfg.get("quantization_config", {}), dict):
        raise ModelFormatError(f"{src / 'config.json'}: quantization_config must be an object")
    if "quantization_config" in cfg and not allow_requantize:
        raise ConfigError(f"{src} is already quantized ({cfg['quantization_config'].get('quant_method')})",
                          hint="quantize the original checkpoint, or pass --requantize")
    calib_path = Path(calib) if calib is not None else None
    check_output(out, [src, calib_path if calibrates(recipe) else None], force=force)
    arch = parse_arch(cfg)
    store = WeightStore.open(src)
    if "quantization_config" in cfg:               # asked explicitly: start from the dequantized weights
        from llmc.model import load_checkpoint
        store = DequantizedView(load_checkpoint(src, passes=()).weights)
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    graph = build_decoder_graph(arch)
    missing = [n for n in graph.weight_names() if n not in store]
    if missing:
        raise ConfigError(f"{src}: the checkpoint lacks the tensor {missing[0]!r}")
    linear_names = {n.inputs[1] for n in graph.nodes if n.op == "linear"}
    check_model_fits(recipe, arch, {n: tuple(store.shape(n)) for n in linear_names})
    skip = [n for n in graph.weight_names()
            if n in linear_names and any(fnmatch.fnmatch(n, p) for p in recipe.scheme.skip)]
    runner = calibration = hidden = None
    if calibrates(recipe):
        data = load_calibration(Tokenizer(src), calib_path, recipe.calib_samples, recipe.calib_seqlen,
                                vocab_size=arch.vocab_size, seed=recipe.calib_seed)
        calibration = data.provenance
        if calibrates_layers(recipe):
            runner = LayerRunner(arch, graph, data.samples)
    sensitivity = plan = None
    formats: dict[str, Any] = {}
    if recipe.sensitivity or recipe.mixed:
        from llmc.mixed_precision import apply_plan, plan as mixed_plan
        sensitivity, plan = mixed_plan(arch, graph, store, data.samples, recipe,
                                       {n for n in linear_names if n not in skip}, on_progress)
        if plan is not None:
            recipe, formats = apply_plan(recipe, sensitivity, plan)
    embed_q = None                                   # the quantized table; calibration starts from its values
    if recipe.embeddings is not None:
        embed_q = quantize_weight(store.get(EMBED_NAME).float(), recipe.embeddings, EMBED_NAME,
                                  weight_observer(recipe))
    if runner is not None:
        hidden = runner.embed(store.get(EMBED_NAME) if embed_q is None else dequantize(embed_q))
    head_src = next(n.inputs[1] for n in graph.nodes if n.op == "logits")
    untie = head_src == EMBED_NAME and recipe.head != recipe.embeddings     # tied, in two formats: own head copy
    producers = graph.producers()
    entries: dict[str, QuantizedEntry] = {}
    reports, weight_map = [], {}
    groups = [str(i) for i in range(arch.num_layers)] + ["other"]
    with atomic_directory(out, overwrite=force, inputs=[src, calib_path]) as tmp:
        for gi, layer in enumerate(groups):
            t1 = time.perf_counter()
            names = [n for n in graph.weight_names() if _layer_of(n) == layer]
            nodes = layer_nodes(graph, int(layer)) if layer != "other" else ()
            original = {n: store.get(n) for n in names}
            work = LayerWork(fp={n: t.float() for n, t in original.items()},
                             linears=[(n.inputs[1], n.inputs[0]) for n in nodes if n.op == "linear"],
                             producers=producers, stats={}, fmt=recipe.scheme.weight,
                             targets={n for n in names if n in linear_names and n not in skip}, arch=arch,
                             recipe=recipe, formats=formats)
            reference_fp = dict(work.fp)
            out_sqnr, kv_stats = None, None
            if runner is not None and nodes:
                fp_out, kv_stats = _calibrate_layer(runner, int(layer), hidden, work, spec,
                                                    recipe.kv_cache is not None)
            quantized = attach_activation_format(work, spec.fn(work))
            if untie and head_src in names:                 # the head's own copy of the tied table
                names, original[LM_HEAD], work.fp[LM_HEAD] = names + [LM_HEAD], original[head_src], work.fp[head_src]
                reference_fp[LM_HEAD] = work.fp[LM_HEAD]
            if embed_q is not None and EMBED_NAME in names:
                quantized[EMBED_NAME] = embed_q             # a head tied to it (same format) is this tensor
            head = LM_HEAD if untie else head_src
            if recipe.head is not None and head in names and head not in quantized:   # round to nearest
                quantized[head] = quantize_weight(work.fp[head], recipe.head, head, work.weight_observer)
            if runner is not None and nodes:                 # true sequential: the next layer sees these
                weights = {**work.fp, **quantized}
                hidden = [h for h, _ in runner.run(int(layer), hidden, weights.__getitem__)]
                out_sqnr = sqnr_db(torch.cat(fp_out), torch.cat(hidden))
            tensors, sqnrs = _layer_tensors(names, original, reference_fp, work, quantized, entries)
            if kv_stats is not None:
                for scale_name, stats in zip(kv_scale_names(int(layer)), kv_stats):
                    tensors[scale_name] = kv_head_scales(stats, arch.num_kv_heads, recipe.kv_cache,
                                                         work.act_observer)
            shard = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(tmp / shard), metadata={"format": "pt", "producer": f"llmc {__version__}"})
            weight_map.update({k: shard for k in tensors})
            del tensors, original, work
            finite = [x for x in sqnrs if x != float("inf")]
            report = LayerReport(layer, len(sqnrs), min(finite) if finite else None, _mean(sqnrs),
                                 time.perf_counter() - t1, out_sqnr)
            reports.append(report)
            if on_layer is not None:
                on_layer(report, len(groups))
        write_json_atomic(tmp / INDEX_FILE, {"metadata": {"producer": f"llmc {__version__}"},
                                             "weight_map": weight_map})
        extra = {"sensitivity": sensitivity.to_dict()} if sensitivity is not None else {}
        if plan is not None:
            extra["mixed_precision"] = plan.to_dict(sensitivity)
        qcfg = manifest_section(entries, recipe=given.to_dict(), llmc_version=__version__,
                                source=str(src), skipped=skip, calibration=calibration, **extra)
        write_json_atomic(tmp / "config.json", {**cfg, **({"tie_word_embeddings": False} if untie else {}),
                                                "quantization_config": qcfg})
        for name in TOKENIZER_FILES:
            copy_model_file(src, name, tmp)
    bytes_out = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return QuantizeResult(output=str(out), source=str(src), recipe=given.to_dict(), layers=reports,
                          seconds=time.perf_counter() - t0,
                          peak_rss_bytes=peak_rss_bytes(),
                          bytes_in=store.nbytes(), bytes_out=bytes_out, skipped=skip, calibration=calibration,
                          sensitivity=extra.get("sensitivity"), mixed_precision=extra.get("mixed_precision"))


QUANTIZE_FORMATS = ("llmc", "gptq")


def quantize(model: Path | str, out: Path | str, recipe: QuantRecipe, *, format: str = "llmc",
             force: bool = False, allow_requantize: bool = False, calib: Path | str | None = None,
             fit_context: bool = False,
             on_layer: Callable[[LayerReport, int], None] | None = None,
             on_progress: Callable[[str, int, int], None] | None = None) -> tuple[QuantizeResult, dict | None]:
    """`llmc quantize`: quantize_checkpoint, then for `format="gptq"` the GPTQ-layout export, with
    every check that can fail done before the work. Returns the result and the export summary.

    fit_context=True caps a calibration window longer than the model's context to the context (for
    a recipe whose calib_seqlen is a default, not a choice: `llmc quantize` without --calib-seqlen);
    otherwise such a recipe is refused. The result's recipe is the one carried out."""
    from llmc.gptq_format import check_exportable, export_gptq

    if format not in QUANTIZE_FORMATS:
        raise OptionError("format", f"unknown format {format!r}; choose {' or '.join(QUANTIZE_FORMATS)}")
    out, src = Path(out), check_path(model)
    check_recipe(recipe)
    if format == "gptq" and recipe.mixed:
        raise OptionError("format", "a mixed-precision target (--target-bpw, --target-size) gives layers several "
                                    "formats; the GPTQ layout holds one bit width and group size: use --format llmc")
    if format == "gptq" and (recipe.head is not None or recipe.embeddings is not None):
        raise OptionError("format", "the GPTQ layout holds the decoder's linears only, not a quantized LM head or "
                                    "embedding table (--head, --embeddings): use --format llmc for those")
    if fit_context and calibrates(recipe):
        check_model_files(src)
        context = parse_arch(read_json(src / "config.json", "config.json")).max_position_embeddings
        recipe = replace(recipe, calib_seqlen=min(recipe.calib_seqlen, context))
    if format == "llmc":
        return quantize_checkpoint(src, out, recipe, force=force, allow_requantize=allow_requantize,
                                   calib=calib, on_layer=on_layer, on_progress=on_progress), None
    check_output(out, [src, calib], force=force)
    arch = parse_arch(read_json(src / "config.json", "config.json"))
    store, graph = WeightStore.open(src), build_decoder_graph(arch)
    linears = {n.inputs[1] for n in graph.nodes if n.op == "linear"}
    check_exportable(recipe.scheme.weight, {n: tuple(store.shape(n)) for n in graph.weight_names() if n in linears
                                            and not any(fnmatch.fnmatch(n, p) for p in recipe.scheme.skip)})
    work = temp_path(out, "work")               # the llmc checkpoint, removed after the export
    try:
        r = quantize_checkpoint(src, work, recipe, calib=calib, allow_requantize=allow_requantize,
                                on_layer=on_layer, on_progress=on_progress)
        export = export_gptq(work, out, round_scales=True, force=force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return replace(r, output=str(out), bytes_out=export["bytes"]), export


class DequantizedView:
    """A quantized checkpoint's weights, dequantized to fp32 on read (re-quantization)."""

    def __init__(self, store) -> None:
        self.store = store

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.store.shape(name))

    def get(self, name: str) -> torch.Tensor:
        t = self.store.get(name)
        return dequantize(t) if isinstance(t, QuantizedWeight) else t

    def nbytes(self) -> int:
        return self.store.nbytes()


def _calibrate_layer(runner, i: int, hidden: list[torch.Tensor], work: LayerWork, spec: AlgorithmSpec,
                     kv: bool) -> tuple[list[torch.Tensor], list[InputStats] | None]:
    """Run layer i in float on the calibration states: fill work.stats for its linears' inputs;
    return its float outputs and, for a quantized KV cache, the statistics of what the cache stores
    (k after rope, and v)."""
    inputs = tuple(dict.fromkeys(x for _, x in work.linears))
    kv_values = (f"l{i}.kr", f"l{i}.v") if kv else ()
    work.stats = {x: InputStats.new(input_width(work, x), spec.hessian) for x in inputs}
    kv_stats = [InputStats.new(work.arch.num_kv_heads * work.arch.head_dim, False) for _ in kv_values]
    fp_out = []
    for h, caps in runner.run(i, hidden, work.fp.__getitem__, capture=inputs + kv_values):
        fp_out.append(h)
        for x in inputs:
            work.stats[x].add(caps[x])
        for stats, v in zip(kv_stats, kv_values):
            stats.add(caps[v])
        del caps, h
    return fp_out, (kv_stats if kv else None)

def _layer_tensors(names: list[str], original: dict[str, torch.Tensor], reference_fp: dict[str, torch.Tensor],
                   work: LayerWork, quantized: dict[str, QuantizedWeight],
                   entries: dict[str, QuantizedEntry]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The tensors of one shard: quantized weights packed, rescaled ones (AWQ, SmoothQuant) in their
    stored dtype, untouched ones as stored; and each quantized weight's SQNR."""
    tensors, sqnrs = {}, []
    for name in names:
        if name in quantized:
            qw = quantized[name]
            sqnrs.append(sqnr_db(work.fp[name], dequantize(qw)))       # vs what was quantized
            tensors.update(qw.tensors(name))
            entries[name] = QuantizedEntry.of(qw)
        elif work.fp[name] is reference_fp[name]:
            tensors[name] = original[name].contiguous()
        else:
            tensors[name] = work.fp[name].to(original[name].dtype).contiguous()
    return tensors, sqnrs


