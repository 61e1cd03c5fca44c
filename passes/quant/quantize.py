"""`quantize`: a Hugging Face checkpoint -> a quantized checkpoint directory (atomic write).

Weights are read lazily and written one decoder layer per safetensors shard, so memory holds one
layer at a time. Algorithms are registered by name with the schemes they serve; every linear
weight of the decoder (but the `skip` patterns) is quantized in the scheme's weight format, and
the per-layer error (SQNR of the dequantized weights) is reported.
"""
from __future__ import annotations

import fnmatch
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from llmc import __version__
from llmc.arch import parse_arch
from llmc.checkpoint import INDEX_FILE, WeightStore, read_json
from llmc.decoder import EMBED as EMBED_NAME, build_decoder_graph
from llmc.errors import ConfigError, ModelFormatError, OptionError
from llmc.io import atomic_directory, check_output, temp_path, write_json_atomic
from llmc.memory import return_large_blocks_to_system
from llmc.paths import copy_model_file
from llmc.passes.quant.formats import QuantizedWeight, dequantize, quantize as quantize_weight
from llmc.passes.quant.observers import Observer
from llmc.passes.quant.scheme import QuantRecipe, TensorQuant
from llmc.passes.quant.store import QuantizedEntry, manifest_section
from llmc.tokenizer import TOKENIZER_FILES

@dataclass
class InputStats:
    """What calibration saw at one linear input: sum of x x^T, sum and max of |x|, and a sample of
    rows spread evenly over all of it: the rows whose index is a multiple of `stride`, the stride
    doubling whenever the sample would pass SAMPLE_ROWS (so it ends with 256 to 512 rows)."""
    hessian: torch.Tensor | None
    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    sample: list[torch.Tensor]
    count: int = 0
    stride: int = 1
    SAMPLE_ROWS = 512

    @classmethod
    def new(cls, width: int, hessian: bool) -> "InputStats":
        return cls(torch.zeros(width, width) if hessian else None, torch.zeros(width),
                   torch.zeros(width), [])

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)              # in place: no [K, K] temporary
        a = x.abs()
        self.abs_sum += a.sum(dim=0)
        self.abs_max = torch.maximum(self.abs_max, a.amax(dim=0))
        del a
        self.sample.append(x[(-self.count) % self.stride::self.stride].clone())
        self.count += len(x)
        while sum(len(t) for t in self.sample) > self.SAMPLE_ROWS:
            self.sample = [self.rows[::2]]           # keeps the multiples of the doubled stride
            self.stride *= 2

    @property
    def absmean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def rows(self) -> torch.Tensor:
        return torch.cat(self.sample)


@dataclass
class LayerWork:
    """One decoder layer for an algorithm: its float weights (which an algorithm may rescale, e.g.
    AWQ folding into norms), its linears with their input values, and calibration statistics."""
    fp: dict[str, torch.Tensor]
    linears: list[tuple[str, str]]            # (weight name, input value name), graph order
    producers: dict[str, object]              # value name -> the node producing it (llmc.ir.Node)
    stats: dict[str, InputStats]              # by input value name
    fmt: TensorQuant
    targets: set[str]                         # weights to quantize (not skipped)
    arch: object
    recipe: QuantRecipe | None = None
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)   # input -> s: consumers now see x / s

    @property
    def weight_observer(self) -> Observer | None:
        return None if self.recipe is None else Observer(self.recipe.weight_observer, self.recipe.percentile)

    @property
    def act_observer(self) -> Observer:
        return Observer() if self.recipe is None else Observer(self.recipe.act_observer, self.recipe.percentile)


LayerAlgorithm = Callable[[LayerWork], dict[str, QuantizedWeight]]


@dataclass(frozen=True)
class AlgorithmSpec:
    fn: LayerAlgorithm
    schemes: tuple[str, ...]             # schemes this algorithm can produce
    calibrated: bool                     # needs calibration statistics
    hessian: bool = False
    observes_weights: bool = True        # its weight scales come from the recipe's weight observer


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register_algorithm(name: str, schemes: tuple[str, ...], calibrated: bool, hessian: bool = False,
                       observes_weights: bool = True):
    def add(fn: LayerAlgorithm) -> LayerAlgorithm:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice")
        ALGORITHMS[name] = AlgorithmSpec(fn, schemes, calibrated, hessian, observes_weights)
        return fn
    return add


@register_algorithm("rtn", schemes=("w8a16", "w4a16", "w8a8", "fp8"), calibrated=False)
def rtn(work: LayerWork) -> dict[str, QuantizedWeight]:
    """Round to nearest: each weight on its own, no calibration."""
    return _quantize_targets(work)


@register_algorithm("gptq", schemes=("w8a16", "w4a16"), calibrated=True, hessian=True)
def gptq_layer(work: LayerWork) -> dict[str, QuantizedWeight]:
    from llmc.passes.quant.gptq import gptq
    return {name: gptq(work.fp[name], work.stats[x].hessian, work.fmt, name=name, observer=work.weight_observer)
            for name, x in work.linears if name in work.targets}


def _by_input(work: LayerWork) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, x in work.linears:
        if name in work.targets:
            groups.setdefault(x, []).append(name)
    return groups


def _scale_input(work: LayerWork, x: str, names: list[str], s: torch.Tensor, fold) -> None:
    """Consumers of x get columns * s; the producer of x gets 1/s (so the layer computes the same)."""
    for n in names:
        work.fp[n] = work.fp[n] * s
    kind, target, bias = fold
    work.fp[target] = work.fp[target] / (s if kind == "norm" else s[:, None])
    if bias is not None:
        work.fp[bias] = work.fp[bias] / s
    work.smooth[x] = work.smooth.get(x, torch.ones_like(s)) * s


def _quantize_targets(work: LayerWork) -> dict[str, QuantizedWeight]:
    return {name: quantize_weight(work.fp[name], work.fmt, name, work.weight_observer)
            for name, _ in work.linears if name in work.targets}


@register_algorithm("awq", schemes=("w8a16", "w4a16"), calibrated=True, observes_weights=False)
def awq_layer(work: LayerWork) -> dict[str, QuantizedWeight]:
    """Per shared input, in graph order: search the scales, scale the consumers' columns by s and
    fold 1/s into the producer (norm weight, or the rows of the linear feeding it); then quantize.
    Inputs with nowhere to fold 1/s keep s = 1 (plain RTN)."""
    from llmc.passes.quant.awq import AWQConfig, clip_weight, search_scale
    cfg = AWQConfig(clip=work.recipe.awq_clip if work.recipe is not None else True)
    for x, names in _by_input(work).items():
        fold = _fold_target(work, x)
        if fold is not None:
            stats = work.stats[x]
            s, _, _ = search_scale(stats.rows, stats.absmean, [work.fp[n] for n in names], work.fmt, cfg)
            _scale_input(work, x, names, s, fold)
    if cfg.clip:                                             # shrink each group's range where that helps
        for name, x in work.linears:
            if name in work.targets:
                work.fp[name] = clip_weight(work.fp[name], work.stats[x].rows / work.smooth.get(x, 1.0),
                                            work.fmt, cfg)
    return _quantize_targets(work)


@register_algorithm("smoothquant", schemes=("w8a8",), calibrated=True)
def smoothquant_layer(work: LayerWork) -> dict[str, QuantizedWeight]:
    """SmoothQuant (Xiao et al., 2022): s = max|x|^a / max|w|^(1-a) per input channel moves the
    activations' outliers into the weights, where per-channel int8 absorbs them; folded like AWQ."""
    alpha = work.recipe.smooth_alpha if work.recipe is not None else 0.5
    for x, names in _by_input(work).items():
        fold = _fold_target(work, x)
        if fold is None:
            continue
        amax_x = work.stats[x].abs_max.clamp(min=1e-5)
        amax_w = torch.stack([work.fp[n].abs().amax(dim=0) for n in names]).amax(dim=0).clamp(min=1e-5)
        s = (amax_x.pow(alpha) / amax_w.pow(1 - alpha)).clamp(min=1e-5)
        _scale_input(work, x, names, s, fold)
    return _quantize_targets(work)


def attach_activation_format(work: LayerWork, quantized: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """Record how each quantized linear's input is quantized at run time; static (per-tensor)
    formats get their scale from the input as smoothed, over the range the activation observer
    chooses (minmax: the maximum over every calibration token)."""
    act = work.recipe.scheme.activation if work.recipe is not None else None
    if act is None:
        return quantized
    out = {}
    for name, x in work.linears:
        if name not in quantized:
            continue
        scale = None
        if act.granularity == "tensor":
            stats, s = work.stats[x], work.smooth.get(x, 1.0)
            scale = work.act_observer.static_scale((stats.abs_max / s).max(), (stats.rows / s).reshape(-1), act)
            scale = scale.clamp(min=1e-12).reshape(1)
        out[name] = replace(quantized[name], act=act, act_scale=scale)
    return out


def _fold_target(work: LayerWork, x: str):
    """Where 1/s for input x can go: ("norm", weight) for an RMSNorm over the whole width;
    ("linear", weight, bias) for the up projection feeding silu_mul, or v_proj feeding attention
    when every head has its own KV head."""
    p = work.producers.get(x)
    if p is None:
        return None
    if p.op == "rms_norm" and p.attr("group") == work.fp[p.inputs[1]].shape[0] and p.attr("group") == \
            work.arch.hidden_size:
        return ("norm", p.inputs[1], None)
    if p.op == "silu_mul":
        up = work.producers.get(p.inputs[1])
    elif p.op == "attention" and p.attr("num_heads") == p.attr("num_kv_heads"):
        up = work.producers.get(p.inputs[2])
    else:
        return None
    if up is None or up.op != "linear":
        return None
    return ("linear", up.inputs[1], up.inputs[2] if len(up.inputs) > 2 else None)


def check_recipe(recipe: QuantRecipe) -> AlgorithmSpec:
    """The recipe is one llmc can carry out (errors name the option: OptionError)."""
    algo, scheme = recipe.algorithm, recipe.scheme.name
    spec = ALGORITHMS.get(algo)
    if spec is None:
        raise OptionError("algo", f"unknown algorithm {algo!r}; known: {', '.join(ALGORITHMS)}")
    if scheme not in spec.schemes:
        raise OptionError("algo", f"algorithm {algo!r} does not produce scheme {scheme!r}",
                          hint=f"{algo} serves: {', '.join(spec.schemes)}")
    if recipe.kv_cache is not None and recipe.kv_cache.dtype not in ("int8", "fp8_e4m3"):
        raise OptionError("kv_cache", f"the KV cache can be int8 or fp8, not {recipe.kv_cache.dtype}")
    for option, name in (("observer", recipe.weight_observer), ("act_observer", recipe.act_observer)):
        try:
            Observer(name, recipe.percentile)                  # raises on an unknown name or percentile
        except OptionError as e:
            raise OptionError(option if e.option == "observer" else e.option, e.reason) from None
    if recipe.weight_observer != "minmax" and not spec.observes_weights:
        raise OptionError("observer", f"algorithm {algo!r} chooses its own weight ranges; drop --observer "
                          f"{recipe.weight_observer}", hint="awq searches each group's clipping (--awq-clip)")
    return spec


def calibrates(recipe: QuantRecipe) -> bool:
    """Whether the recipe reads calibration text: a calibrated algorithm, static input scales or a
    quantized KV cache."""
    act = recipe.scheme.activation
    return (ALGORITHMS[recipe.algorithm].calibrated or (act is not None and act.granularity == "tensor")
            or recipe.kv_cache is not None)


def applicable_options(recipe: QuantRecipe) -> set[str]:
    """The quantize options (as `llmc quantize` names them) that change what this recipe does;
    giving any other one is a mistake the CLI reports."""
    spec = ALGORITHMS[recipe.algorithm]
    w = recipe.scheme.weight
    used = {"scheme", "algo", "kv_cache", "format"}
    if w.granularity == "group":
        used.add("group_size")
    if w.dtype == "int4":
        used.add("asymmetric")
    if recipe.algorithm == "smoothquant":
        used.add("alpha")
    if recipe.algorithm == "awq":
        used.add("awq_clip")
    if spec.observes_weights:
        used.add("observer")
    act = recipe.scheme.activation
    if recipe.kv_cache is not None or (act is not None and act.granularity == "tensor"):
        used.add("act_observer")
    if "percentile" in (recipe.weight_observer if spec.observes_weights else None, recipe.act_observer):
        used.add("percentile")
    if calibrates(recipe):
        used |= {"calib", "calib_samples", "calib_seqlen"}
    return used


def check_model_fits(recipe: QuantRecipe, arch, shapes: dict[str, tuple[int, ...]]) -> None:
    """What only the model can tell: calibration windows within its context, groups no wider than
    its widest linear input. Checked before any work."""
    if calibrates(recipe) and recipe.calib_seqlen > arch.max_position_embeddings:
        raise OptionError("calib_seqlen", f"{recipe.calib_seqlen} tokens is longer than the model's context "
                          f"({arch.max_position_embeddings}, max_position_embeddings)",
                          hint=f"use --calib-seqlen {arch.max_position_embeddings} or less")
    g = recipe.scheme.weight.group_size
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


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[2] if name.startswith("model.layers.") else "other"


def _mean(xs: list[float]) -> float | None:
    finite = [x for x in xs if x != float("inf")]
    return sum(finite) / len(finite) if finite else None


def quantize_checkpoint(model: Path | str, out: Path | str, recipe: QuantRecipe, force: bool = False,
                        allow_requantize: bool = False, calib: Path | str | None = None,
                        on_layer: Callable[[LayerReport, int], None] | None = None) -> QuantizeResult:
    """Quantize every linear of the decoder (but the scheme's `skip` patterns) with the recipe's
    algorithm; calibrated algorithms walk the layers in order on the calibration text."""
    from llmc.model import check_model_files, check_path
    from llmc.passes.kv_cache import kv_scale_names
    from llmc.passes.quant.calibrate import LayerRunner, layer_nodes, load_calibration
    from llmc.tokenizer import Tokenizer

    t0 = time.perf_counter()
    return_large_blocks_to_system()               # calibration frees many large blocks (llmc.memory)
    src, out = check_path(model), Path(out)
    spec = check_recipe(recipe)
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
                                vocab_size=arch.vocab_size)
        calibration = data.provenance
        runner = LayerRunner(arch, graph, data.samples)
        hidden = runner.embed(store.get(EMBED_NAME))
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
                             recipe=recipe)
            reference_fp = dict(work.fp)
            out_sqnr, kv_stats = None, None
            if runner is not None and nodes:
                fp_out, kv_stats = _calibrate_layer(runner, int(layer), hidden, work, spec,
                                                    recipe.kv_cache is not None)
            quantized = attach_activation_format(work, spec.fn(work))
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
        qcfg = manifest_section(entries, recipe=recipe.to_dict(), llmc_version=__version__,
                                source=str(src), skipped=skip, calibration=calibration)
        write_json_atomic(tmp / "config.json", {**cfg, "quantization_config": qcfg})
        for name in TOKENIZER_FILES:
            copy_model_file(src, name, tmp)
    bytes_out = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return QuantizeResult(output=str(out), source=str(src), recipe=recipe.to_dict(), layers=reports,
                          seconds=time.perf_counter() - t0,
                          peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          bytes_in=store.nbytes(), bytes_out=bytes_out, skipped=skip, calibration=calibration)


QUANTIZE_FORMATS = ("llmc", "gptq")


def quantize(model: Path | str, out: Path | str, recipe: QuantRecipe, *, format: str = "llmc",
             force: bool = False, allow_requantize: bool = False, calib: Path | str | None = None,
             on_layer: Callable[[LayerReport, int], None] | None = None) -> tuple[QuantizeResult, dict | None]:
    """`llmc quantize`: quantize_checkpoint, then for `format="gptq"` the GPTQ-layout export, with
    every check that can fail done before the work. Returns the result and the export summary."""
    from llmc.model import check_path
    from llmc.passes.quant.gptq_format import check_exportable, export_gptq

    if format not in QUANTIZE_FORMATS:
        raise OptionError("format", f"unknown format {format!r}; choose {' or '.join(QUANTIZE_FORMATS)}")
    out = Path(out)
    if format == "llmc":
        return quantize_checkpoint(model, out, recipe, force=force, allow_requantize=allow_requantize,
                                   calib=calib, on_layer=on_layer), None
    src = check_path(model)
    check_recipe(recipe)
    check_output(out, [src, calib], force=force)
    arch = parse_arch(read_json(src / "config.json", "config.json"))
    store, graph = WeightStore.open(src), build_decoder_graph(arch)
    linears = {n.inputs[1] for n in graph.nodes if n.op == "linear"}
    check_exportable(recipe.scheme.weight, {n: tuple(store.shape(n)) for n in graph.weight_names() if n in linears
                                            and not any(fnmatch.fnmatch(n, p) for p in recipe.scheme.skip)})
    work = temp_path(out, "work")               # the llmc checkpoint, removed after the export
    try:
        r = quantize_checkpoint(src, work, recipe, calib=calib, allow_requantize=allow_requantize,
                                on_layer=on_layer)
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
    work.stats = {x: InputStats.new(_width(work, x), spec.hessian) for x in inputs}
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


def kv_head_scales(stats: InputStats, heads: int, fmt: TensorQuant, observer: Observer) -> torch.Tensor:
    """Per KV head: the scale of the cache's format for the range the observer picks from the
    head's calibrated values ([heads] fp32)."""
    sample = stats.rows.reshape(-1, heads, stats.rows.shape[1] // heads).transpose(0, 1).reshape(heads, -1)
    running = stats.abs_max.reshape(heads, -1).amax(dim=1)
    return observer.static_scale(running, sample, fmt).clamp(min=1e-8).float()


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


def _width(work: LayerWork, x: str) -> int:
    name = next(n for n, v in work.linears if v == x)
    return work.fp[name].shape[1]
