"""Quantization algorithms over one decoder layer at a time: the registry (RTN, GPTQ, AWQ,
SmoothQuant, each with the schemes it serves), the calibration statistics they read (`InputStats`),
the recipe checks that only depend on the algorithms, and the small tensor helpers the driver
(`llmc.quantizer`) shares with them. Functions over tensors and graphs: no checkpoint, no runtime."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from llmc.errors import OptionError
from llmc.passes.quant.observers import Observer
from llmc.quantized.formats import QuantizedWeight, TensorQuant, quantize as quantize_weight
from llmc.quantized.scheme import QuantRecipe
from llmc.registry import Registry


@dataclass
class InputStats:
    """What calibration saw at one linear input: sum of x x^T, sum and max of |x|, and a sample of
    rows spread evenly over all of it: the rows whose index is a multiple of `stride`, the stride
    doubling whenever the sample would pass SAMPLE_ROWS (so it ends with 256 to 512 rows)."""
    hessian: torch.Tensor | None
    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    sample: list[torch.Tensor]
    sq_sum: torch.Tensor | None = None          # sum of x^2 per channel (the importance matrix's diagonal)
    count: int = 0
    stride: int = 1
    SAMPLE_ROWS = 512

    @classmethod
    def new(cls, width: int, hessian: bool) -> "InputStats":
        return cls(torch.zeros(width, width) if hessian else None, torch.zeros(width),
                   torch.zeros(width), [], torch.zeros(width))

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)              # in place: no [K, K] temporary
        a = x.abs()
        self.abs_sum += a.sum(dim=0)
        self.sq_sum += a.square().sum(dim=0)
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
    def importance(self) -> torch.Tensor:
        """Mean x^2 per channel: how much a weight column's error costs at the output, on average
        (llama.cpp's importance matrix)."""
        return self.sq_sum / max(self.count, 1)

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
    formats: dict[str, TensorQuant] = field(default_factory=dict)   # weight -> its own format (mixed precision)

    def importance(self, name: str) -> torch.Tensor | None:
        """With --imatrix, the importance of each input column of weight `name` (None otherwise)."""
        if self.recipe is None or not self.recipe.imatrix:
            return None
        x = next(v for n, v in self.linears if n == name)
        return self.stats[x].importance

    def format_of(self, name: str) -> TensorQuant:
        """A weight's format: its own (a mixed-precision plan gives one per weight) or the scheme's."""
        return self.formats.get(name, self.fmt)

    @property
    def weight_observer(self) -> Observer | None:
        return None if self.recipe is None else weight_observer(self.recipe)

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


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")
MIXED_SCHEMES = ("w4a16", "w8a16")       # weight-only: a mixed-precision target may choose any of their formats


def register_algorithm(name: str, schemes: tuple[str, ...], calibrated: bool, hessian: bool = False,
                       observes_weights: bool = True):
    return ALGORITHMS.decorator(name, lambda fn: AlgorithmSpec(fn, schemes, calibrated, hessian, observes_weights))


@register_algorithm("rtn", schemes=("w8a16", "w4a16", "w8a8", "w4a8", "fp8"), calibrated=False)
def rtn(work: LayerWork) -> dict[str, QuantizedWeight]:
    """Round to nearest: each weight on its own, no calibration."""
    return _quantize_targets(work)


@register_algorithm("gptq", schemes=("w8a16", "w4a16", "w4a8"), calibrated=True, hessian=True)
def gptq_layer(work: LayerWork) -> dict[str, QuantizedWeight]:
    from llmc.passes.quant.gptq import gptq
    return {name: gptq(work.fp[name], work.stats[x].hessian, work.format_of(name), name=name,
                       observer=work.weight_observer, importance=work.importance(name))
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
    return {name: quantize_weight(work.fp[name], work.format_of(name), name, work.weight_observer,
                                  work.importance(name))
            for name, _ in work.linears if name in work.targets}


@register_algorithm("awq", schemes=("w8a16", "w4a16", "w4a8"), calibrated=True, observes_weights=False)
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
            s, _, _ = search_scale(stats.rows, stats.absmean, [work.fp[n] for n in names],
                                   work.format_of(names[0]), cfg)   # one input, one format
            _scale_input(work, x, names, s, fold)
    if cfg.clip:                                             # shrink each group's range where that helps
        for name, x in work.linears:
            if name in work.targets:
                work.fp[name] = clip_weight(work.fp[name], work.stats[x].rows / work.smooth.get(x, 1.0),
                                            work.format_of(name), cfg)
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
        if name is None:                                       # the algorithm's default
            continue
        try:
            Observer(name, recipe.percentile)                  # raises on an unknown name or percentile
        except OptionError as e:
            raise OptionError(option if e.option == "observer" else e.option, e.reason) from None
    if recipe.mixed:
        target = "target_bpw" if recipe.target_bpw is not None else "target_size"
        if recipe.scheme.name not in MIXED_SCHEMES:
            raise OptionError(target, f"chooses among weight-only formats; scheme {scheme!r} is not one",
                              hint=f"use --scheme {' or '.join(MIXED_SCHEMES)}")
        for option, value in (("head", recipe.head), ("embeddings", recipe.embeddings)):
            if value is not None:
                raise OptionError(option, f"is chosen by --{target.replace('_', '-')}; drop one of them")
    if recipe.weight_observer not in (None, "minmax") and not spec.observes_weights:
        raise OptionError("observer", f"algorithm {algo!r} chooses its own weight ranges; drop --observer "
                          f"{recipe.weight_observer}", hint="awq searches each group's clipping (--awq-clip)")
    return spec


DEFAULT_WEIGHT_OBSERVER = "mse"     # never a larger weight error than minmax; lower KL on stories260K (README)


def with_defaults(recipe: QuantRecipe) -> QuantRecipe:
    """The recipe as carried out: a weight observer left unset is the default one where the
    algorithm observes weights (awq searches its own ranges)."""
    if recipe.weight_observer is None and ALGORITHMS[recipe.algorithm].observes_weights:
        return replace(recipe, weight_observer=DEFAULT_WEIGHT_OBSERVER)
    return recipe


def weight_observer(recipe: QuantRecipe) -> Observer:
    """The observer of the recipe's weight scales (one left unset, which `with_defaults` leaves only
    where the algorithm searches its own ranges, is minmax)."""
    return Observer(recipe.weight_observer or "minmax", recipe.percentile)


def calibrates(recipe: QuantRecipe) -> bool:
    """Whether the recipe reads calibration text: its layers are calibrated (`calibrates_layers`) or
    the sensitivity is measured (--sensitivity, a mixed-precision target)."""
    return calibrates_layers(recipe) or recipe.sensitivity or recipe.mixed


def calibrates_layers(recipe: QuantRecipe) -> bool:
    """Whether quantizing a layer reads the calibration states of its inputs: a calibrated
    algorithm, static input scales, a quantized KV cache or an importance matrix (--imatrix)."""
    act = recipe.scheme.activation
    return (ALGORITHMS[recipe.algorithm].calibrated or (act is not None and act.granularity == "tensor")
            or recipe.kv_cache is not None or recipe.imatrix)


def applicable_options(recipe: QuantRecipe) -> set[str]:
    """The quantize options (as `llmc quantize` names them) that change what this recipe does;
    giving any other one is a mistake the CLI reports. But calib_seed is accepted by every recipe,
    so that one seed sweep (run-to-run spread) can run over a set of recipes, rtn ones included;
    without calibration it changes nothing."""
    spec = ALGORITHMS[recipe.algorithm]
    w = recipe.scheme.weight
    used = {"scheme", "algo", "kv_cache", "format", "head", "embeddings", "calib_seed", "sensitivity", "target_bpw",
            "target_size"}
    if w.granularity == "group" and not recipe.mixed:          # a target chooses the formats
        used.add("group_size")
    if w.dtype == "int4" and not recipe.mixed:
        used |= {"asymmetric", "two_level_scales"}
    if recipe.algorithm == "smoothquant":
        used.add("alpha")
    if recipe.algorithm == "awq":
        used.add("awq_clip")
    if spec.observes_weights:
        used.add("observer")
        if recipe.weight_observer in (None, "mse") and recipe.algorithm in ("rtn", "gptq"):
            used.add("imatrix")
    act = recipe.scheme.activation
    if recipe.kv_cache is not None or (act is not None and act.granularity == "tensor"):
        used.add("act_observer")
    if "percentile" in (recipe.weight_observer if spec.observes_weights else None, recipe.act_observer):
        used.add("percentile")
    if calibrates(recipe):
        used |= {"calib", "calib_samples", "calib_seqlen"}
    return used


def kv_head_scales(stats: InputStats, heads: int, fmt: TensorQuant, observer: Observer) -> torch.Tensor:
    """Per KV head: the scale of the cache's format for the range the observer picks from the
    head's calibrated values ([heads] fp32)."""
    sample = stats.rows.reshape(-1, heads, stats.rows.shape[1] // heads).transpose(0, 1).reshape(heads, -1)
    running = stats.abs_max.reshape(heads, -1).amax(dim=1)
    return observer.static_scale(running, sample, fmt).clamp(min=1e-8).float()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))

def input_width(work: LayerWork, x: str) -> int:
    """The width of linear input x (the in-features of a linear that reads it)."""
    name = next(n for n, v in work.linears if v == x)
    return work.fp[name].shape[1]

