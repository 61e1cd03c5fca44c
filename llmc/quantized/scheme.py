"""Quantization schemes as frozen dataclasses, one axis each: the number format (`TensorQuant`),
what is quantized (`QuantScheme`) and how the numbers are found (`QuantRecipe`: the algorithm,
calibration). The kernel that runs a format is a third, separate axis (registered by format).

Each `llmc quantize` option is declared once, as an `Option` on the QuantRecipe field it sets; the
command line's flags, a profile's [quantize] keys and types, `recipe_from_options` and the
recipe's bounds all come from those declarations. `QuantRecipe.to_dict` / `from_dict` are the
recipe as a quantized checkpoint stores it."""
from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from types import NoneType, UnionType
from typing import Any, Callable, Literal

from llmc.checkpoint import short_repr
from llmc.errors import ConfigError, ModelFormatError, OptionError
from llmc.quantized.formats import SCALE_BITS, TensorQuant, plain_fields


@dataclass(frozen=True, kw_only=True)
class QuantScheme:                                     # what the numbers are
    name: str
    weight: TensorQuant
    activation: TensorQuant | None = None              # None means weight-only
    skip: tuple[str, ...] = ("lm_head.weight", "model.embed_tokens.weight")   # fnmatch patterns

    def to_dict(self) -> dict[str, Any]:
        return plain_fields(self)


W8A16 = QuantScheme(name="w8a16", weight=TensorQuant(dtype="int8", granularity="channel"))
W4A16 = QuantScheme(name="w4a16", weight=TensorQuant(dtype="int4", granularity="group", group_size=128,
                                                     symmetric=False))    # the lower KL, measured (README)
W8A8 = QuantScheme(name="w8a8", weight=TensorQuant(dtype="int8", granularity="channel"),
                   activation=TensorQuant(dtype="int8", granularity="token"))
FP8 = QuantScheme(name="fp8", weight=TensorQuant(dtype="fp8_e4m3", granularity="channel"),
                  activation=TensorQuant(dtype="fp8_e4m3", granularity="tensor"))
W4A8 = QuantScheme(name="w4a8", weight=TensorQuant(dtype="int4", granularity="group", group_size=32),
                   activation=TensorQuant(dtype="int8", granularity="group", group_size=32))   # Q4_0 x Q8_0
SCHEMES = {s.name: s for s in (W8A16, W4A16, W8A8, W4A8, FP8)}
KV_CACHE_DTYPES = {"int8": "int8", "fp8": "fp8_e4m3"}
HEAD_FORMATS = {"int8": TensorQuant(dtype="int8", granularity="channel"),          # `--head`; float: None
                "int4": TensorQuant(dtype="int4", granularity="group", group_size=32)}
EMBEDDING_FORMATS = {"int8": TensorQuant(dtype="int8", granularity="channel")}     # `--embeddings`: per token row


def resolve_scheme(name: str, group_size: int | None = None, symmetric: bool | None = None,
                   two_level: bool | None = None) -> QuantScheme:
    """A named scheme with the command line's overrides, derived (never mutated)."""
    if name not in SCHEMES:
        raise OptionError("scheme", f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")
    scheme = SCHEMES[name]
    w = scheme.weight
    if group_size is not None:
        if w.granularity != "group":
            raise OptionError("group_size", f"applies to group-wise schemes (w4a16, w4a8), not {name}")
        w = replace(w, group_size=group_size)
        if scheme.activation is not None and scheme.activation.granularity == "group":   # w4a8: the same groups
            scheme = replace(scheme, activation=replace(scheme.activation, group_size=group_size))
    if symmetric is not None and symmetric != w.symmetric:
        if w.dtype != "int4":
            raise OptionError("asymmetric", f"applies to int4 weights (w4a16, w4a8), not {name}")
        w = replace(w, symmetric=symmetric)
    if two_level is not None and two_level != w.two_level:
        if w.dtype != "int4":
            raise OptionError("two_level_scales", f"applies to int4 weights (w4a16, w4a8), not {name}")
        w = replace(w, scale_bits=SCALE_BITS[0] if two_level else None)
    return replace(scheme, weight=w)


def _scheme_from_options(scheme: str, group_size: int | None, asymmetric: bool | None,
                         two_level: bool | None) -> QuantScheme:
    """--scheme with --group-size, --asymmetric / --symmetric and --two-level-scales / --float16-scales
    (unset: the scheme's own)."""
    return resolve_scheme(scheme, group_size, None if asymmetric is None else not asymmetric, two_level)


def _tensor_format_option(option: str, formats: dict[str, TensorQuant]) -> Callable[[str], TensorQuant | None]:
    """The builder of `--OPTION NAME` (--head, --embeddings): the tensor's format NAME stands for, one of
    `formats`; float (None) keeps the tensor as stored."""
    def build(name: str) -> TensorQuant | None:
        if name == "float":
            return None
        if name not in formats:
            raise OptionError(option, f"unknown {option} format {name!r}; choose {', '.join(formats)} or float")
        return formats[name]
    return build


def _kv_cache_from_option(name: str | None) -> TensorQuant | None:
    """The KV-cache format `--kv-cache NAME` stands for; None keeps the cache in full precision."""
    if name is None:
        return None
    if name not in KV_CACHE_DTYPES:
        raise OptionError("kv_cache", f"unknown KV-cache format {name!r}; choose {' or '.join(KV_CACHE_DTYPES)}")
    return TensorQuant(dtype=KV_CACHE_DTYPES[name], granularity="channel")


@dataclass(frozen=True)
class Option:
    """One `llmc quantize` option. Its name is a profile's [quantize] key and recipe_from_options's
    keyword; the flag is the name with dashes (--group-size). Left unset, it takes `default`
    (None: it sets nothing, e.g. --group-size leaves the scheme's)."""
    name: str
    type: type                           # str, int, float (an int is accepted too) or bool
    help: str
    default: Any = None
    off: str | None = None               # a bool's second flag, without dashes: --no-awq-clip, --symmetric
    low: float | None = None             # inclusive bounds of a value the recipe holds as given
    high: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> str:
        """The command line's declaration: --kv-cache, or --awq-clip/--no-awq-clip for a bool."""
        return f"{self.flag}/--{self.off}" if self.type is bool else self.flag

    @property
    def types(self) -> tuple[type, ...]:
        """The Python (and TOML) types a value may have."""
        return (float, int) if self.type is float else (self.type,)

    @property
    def help_text(self) -> str:
        """The help, with the default and bounds as click shows them for other commands."""
        extra = []
        if self.default is not None:
            shown = ("on" if self.default else "off") if self.type is bool else self.default
            extra.append(f"default: {shown}")
        if self.low is not None and self.high is not None:
            extra.append(f"{self.low}<=x<={self.high}")
        elif self.low is not None or self.high is not None:
            extra.append(f"x>={self.low}" if self.low is not None else f"x<={self.high}")
        return f"{self.help}  [{'; '.join(extra)}]" if extra else self.help

    def checked(self, value: Any) -> Any:
        """`value`, if it has one of the option's types (a bool is not an int here)."""
        if not isinstance(value, self.types) or (isinstance(value, bool) and self.type is not bool):
            raise OptionError(self.name, f"must be {' or '.join(t.__name__ for t in self.types)}, "
                                         f"got {short_repr(value)}")
        return value

    def check_bounds(self, value: float) -> None:
        """Raise OptionError (naming the option) for a value outside [low, high]."""
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            bound = (f"in [{self.low}, {self.high}]" if self.low is not None and self.high is not None
                     else f"at least {self.low}" if self.low is not None else f"at most {self.high}")
            raise OptionError(self.name, f"must be {bound}, got {value}")


def _as_type(tp: type) -> Callable[[Any], Any]:
    """The builder of a field holding its one option's value: the value as `tp`; None (an option
    without a default, left unset: --calib-seed) stays None."""
    return lambda value: None if value is None else tp(value)


def recipe_field(*options: Option, build: Callable[..., Any] | None = None, default: Any = MISSING) -> Any:
    """A QuantRecipe field set by quantize options: `build` makes its value from the options'
    values, in order (by default the one option's value, as its type: an int alpha becomes a
    float; None stays None). A field holding its one option's value takes the option's default."""
    if build is None:
        (option,) = options
        build, default = _as_type(option.type), option.default
    return field(default=default, metadata={"options": options, "build": build})


@dataclass(frozen=True, kw_only=True)
class QuantRecipe:                                     # how we get there
    scheme: QuantScheme = recipe_field(
        Option("scheme", str, "w8a16: int8 per-channel weights (~4x smaller than fp32); w4a16: int4 group-wise "
               "weights (~7x smaller); w8a8: int8 weights and per-token int8 inputs; w4a8: int4 weights and int8 inputs in groups "
               "of 32 (integer dot products, as llama.cpp's Q4_0 x Q8_0); fp8: e4m3 weights and inputs "
               "(static scales; emulated on CPU). Required unless the profile sets it."),
        Option("group_size", int, f"w4a16 / w4a8 group size (default {W4A16.weight.group_size} / "
               f"{W4A8.weight.group_size}, the scheme's)."),
        Option("asymmetric", bool, "int4 weights with a zero point fitted to each group's range (w4a16's default) "
               "or --symmetric around 0 (w4a8's default, as llama.cpp's Q4_0).", off="symmetric"),
        Option("two_level_scales", bool, "int4 group scales stored as 8-bit codes under a float16 scale per 8 groups "
               "(as llama.cpp's k-quants): groups of 32 cost 4.44 bits per weight instead of 4.63, for the weight "
               "error of float16 scales within 1%; not exportable with --format gptq. Default: --float16-scales.",
               off="float16-scales"),
        build=_scheme_from_options)
    algorithm: Literal["rtn", "gptq", "awq", "smoothquant"] = recipe_field(
        Option("algo", str, "rtn (round to nearest); gptq (Hessian-guided error compensation) or awq "
               "(activation-aware scales) for w8a16/w4a16/w4a8; smoothquant (outliers moved into the weights) for "
               "w8a8. All but rtn calibrate.", default="rtn"))
    kv_cache: TensorQuant | None = recipe_field(
        Option("kv_cache", str, "int8 or fp8: store the KV cache quantized with calibrated per-head scales (4x "
               "fewer bytes per token than fp32)."), build=_kv_cache_from_option, default=None)
    head: TensorQuant | None = recipe_field(
        Option("head", str, "int8 (per channel) or int4 (groups of 32): quantize the LM head too, round to nearest "
               "(a tied head gets its own copy unless --embeddings is the same format). Default: float.",
               default="float"),
        build=_tensor_format_option("head", HEAD_FORMATS), default=None)
    embeddings: TensorQuant | None = recipe_field(
        Option("embeddings", str, "int8 (per token row): store the embedding table quantized, round to nearest (a "
               "tied head in another format gets its own copy; with --head int8 the two stay one tensor). "
               "Default: float.", default="float"),
        build=_tensor_format_option("embeddings", EMBEDDING_FORMATS), default=None)
    calib_samples: int = recipe_field(Option("calib_samples", int, "Calibration samples.", default=128, low=1))
    calib_seqlen: int = recipe_field(
        Option("calib_seqlen", int, "Tokens per calibration sample; the default is capped by the model's context.",
               default=512, low=2))
    calib_seed: int | None = recipe_field(
        Option("calib_seed", int, "Draw the calibration samples at random from this seed (windows at a random offset, "
               "a random subset) instead of the first --calib-samples; rerunning a recipe with other seeds shows its "
               "run-to-run spread.", low=0))
    smooth_alpha: float = recipe_field(
        Option("alpha", float, "SmoothQuant migration strength.", default=0.5, low=0, high=1))
    awq_clip: bool = recipe_field(
        Option("awq_clip", bool, "AWQ: also search each group's clipping range.", default=True, off="no-awq-clip"))
    weight_observer: str | None = recipe_field(
        Option("observer", str, "The range weight scales cover: mse (the range, shrunk, with the least squared "
               "error; the default), minmax (all of it) or percentile; for rtn, gptq and smoothquant (awq searches "
               "its own)."))
    act_observer: str = recipe_field(
        Option("act_observer", str, "The same for calibrated scales: fp8 inputs and the KV cache (minmax, "
               "percentile or mse).", default="minmax"))
    percentile: float = recipe_field(
        Option("percentile", float, "For the percentile observers: the percentile of |x| a scale covers, in "
               "(50, 100].", default=99.99))

    imatrix: bool = recipe_field(
        Option("imatrix", bool, "With --observer mse (rtn, gptq): weigh each input column's rounding error by its "
               "mean squared activation on the calibration text when choosing scales (llama.cpp's importance "
               "matrix), so the scales favour the columns that meet large inputs.", default=False,
               off="no-imatrix"))
    sensitivity: bool = recipe_field(
        Option("sensitivity", bool, "Measure what quantizing each group of linears that share an input (q/k/v, "
               "gate/up, o, down), the LM head and the embeddings costs in each candidate format: the KL divergence "
               "from the float model on calibration text. The table goes to the output's quantization_config and "
               "to --json.", default=False, off="no-sensitivity"))
    target_bpw: float | None = recipe_field(
        Option("target_bpw", float, "Mixed precision: choose each group of linears' format (int4 in groups of "
               "32/64/128, symmetric or not, or int8), the head's and the embeddings' (float, int8; int4 for the "
               "head) for the least predicted KL within this many bits per weight on average over them, scales "
               "included (measures the sensitivity). See README, 'Choosing --target-bpw'.", low=2.0, high=32.0))
    target_size: int | None = recipe_field(
        Option("target_size", int, "Mixed precision as --target-bpw, within this many bytes for all the "
               "model's tensors (the files' headers add about 100 bytes per tensor).", low=1))

    def __post_init__(self) -> None:
        """The declared bounds, however the recipe was made (options, from_dict, the constructor)."""
        for f in fields(self):
            for option in f.metadata["options"]:
                value = getattr(self, f.name)
                if value is not None and (option.low is not None or option.high is not None):
                    option.check_bounds(value)
        if self.target_bpw is not None and self.target_size is not None:
            raise OptionError("target_size", "give --target-bpw or --target-size, not both")

    @property
    def mixed(self) -> bool:
        """Formats chosen per weight under a budget (--target-bpw, --target-size)."""
        return self.target_bpw is not None or self.target_size is not None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a quantized checkpoint stores it: every field, by its name."""
        return plain_fields(self)

    @classmethod
    def from_dict(cls, d: Any) -> "QuantRecipe":
        """The recipe `to_dict` wrote. A key it did not write, a value of the wrong type, an unknown
        scheme or a value out of bounds is a ModelFormatError naming the key; a key left out takes
        the field's default (recipes written before the option existed), but for `scheme`."""
        if isinstance(d, dict) and "weight_observer" not in d:
            d = {**d, "weight_observer": "minmax"}        # written before observers: it used minmax
        recipe = _read(cls, d, "")
        if recipe.scheme.name not in SCHEMES:
            raise ModelFormatError(f"quantization recipe: scheme.name is {short_repr(recipe.scheme.name)}, not one "
                                   f"of {', '.join(SCHEMES)}")
        return recipe


QUANTIZE_OPTIONS: dict[str, Option] = {o.name: o for f in fields(QuantRecipe) for o in f.metadata["options"]}


def quantize_option_types() -> dict[str, tuple[type, ...]]:
    """The [quantize] keys of a profile that set the recipe, with the types each accepts."""
    return {name: option.types for name, option in QUANTIZE_OPTIONS.items()}


def recipe_from_options(scheme: str | None, **options: Any) -> QuantRecipe:
    """A recipe from `llmc quantize`'s option names (as a profile's [quantize] table spells them);
    options left out or None take their declared defaults."""
    unknown = set(options) - set(QUANTIZE_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown quantize option(s): {', '.join(sorted(unknown))}")
    if scheme is None:
        raise ConfigError("missing --scheme", hint=f"give --scheme {'|'.join(SCHEMES)}, or a --profile that sets it")
    given = {**options, "scheme": scheme}
    values = {name: o.default if given.get(name) is None else o.checked(given[name])
              for name, o in QUANTIZE_OPTIONS.items()}
    return QuantRecipe(**{f.name: f.metadata["build"](*(values[o.name] for o in f.metadata["options"]))
                          for f in fields(QuantRecipe)})


def _read(tp: Any, value: Any, key: str) -> Any:
    """`value`, parsed JSON as `plain_fields` writes it, read as the field type `tp` (a dataclass, a
    Literal, X | None, tuple[X, ...], str, int, float or bool); `key` is its path, for errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_dataclass(tp):
        return _read_dataclass(tp, value, key)
    if origin is UnionType or origin is typing.Union:
        if value is None and NoneType in args:
            return None
        (tp,) = [a for a in args if a is not NoneType]
        return _read(tp, value, key)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise _malformed(key, value, f"one of {', '.join(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise _malformed(key, value, "a list")
        return tuple(_read(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    types = (float, int) if tp is float else (tp,)
    if not isinstance(value, types) or (isinstance(value, bool) and tp is not bool):
        raise _malformed(key, value, " or ".join(t.__name__ for t in types))
    return float(value) if tp is float else value


def _read_dataclass(cls: type, value: Any, key: str) -> Any:
    """An object of `cls`'s fields: no other key, every field without a default present; an error
    its constructor raises is reported under `key` (by field name, not option name)."""
    if not isinstance(value, dict):
        raise _malformed(key, value, "an object")
    prefix = f"{key}." if key else ""
    by_name = {f.name: f for f in fields(cls)}
    for k in value:
        if k not in by_name:
            raise ModelFormatError(f"quantization recipe: unknown key {prefix}{k}; known: {', '.join(by_name)}")
    for name, f in by_name.items():
        if name not in value and f.default is MISSING:
            raise ModelFormatError(f"quantization recipe: missing key {prefix}{name}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _read(hints[k], v, prefix + k) for k, v in value.items()}
    try:
        return cls(**kwargs)
    except OptionError as e:
        name = next((f.name for f in fields(cls) for o in f.metadata.get("options", ()) if o.name == e.option),
                    e.option)
        raise ModelFormatError(f"quantization recipe: {prefix}{name}: {e.reason}") from None
    except ConfigError as e:
        raise ModelFormatError(f"{_where(key)}: {e.message}") from None


def _where(key: str) -> str:
    return f"quantization recipe: {key}" if key else "quantization recipe"


def _malformed(key: str, value: Any, kind: str) -> ModelFormatError:
    return ModelFormatError(f"{_where(key)} is {short_repr(value)}, not {kind}")
