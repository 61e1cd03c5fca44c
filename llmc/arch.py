"""Architecture configs: a Hugging Face config.json normalised into one frozen `ArchConfig`.

Each supported `model_type` registers a parser that states how its family differs (biases,
q/k norms, sliding windows). Everything downstream reads `ArchConfig`, never the raw dict.

Every value is checked by one function, `_validate`, against one table of field specs (type and
bounds), whether it comes from a config.json (`parse_arch`) or an engine manifest
(`ArchConfig.from_dict`). Sizes have generous upper bounds, so that a config stating nonsense
(ten million layers) fails at once, before anything is built from it.
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, Mapping

from llmc.errors import ModelFormatError, UnsupportedModelError
from llmc.registry import Registry

# Upper bounds: several times the largest public checkpoints (405B: 126 layers, hidden 16384,
# 128 heads; vocabularies up to 256k; contexts up to 10M positions).
MAX_LAYERS = 1024
MAX_HIDDEN = 2 * 65536
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 2 ** 22
MAX_INTERMEDIATE = 2 ** 20
MAX_POSITIONS = 2 ** 24
MAX_RMS_NORM_EPS = 1.0

CONFIG_FILE = "config.json"
MANIFEST_SECTION = "architecture"          # what engine.json calls the dict `from_dict` reads

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 4, 4


def show_value(v: Any) -> str:
    """A value for an error message: short, one line, JSON's names for null/true/false."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, int) and v.bit_length() > 64:        # repr() refuses ints of over 4300 digits
        return f"an integer of {v.bit_length()} bits"
    try:
        return _SHORT.repr(v)
    except (ValueError, RecursionError):
        return f"a {type(v).__name__}"


# ---- field specs: what one value may be --------------------------------------------------------
class Spec:
    """A check of one JSON value. `check` returns the value as llmc holds it or raises, naming `name`."""
    want = "a value"

    def accepts(self, v: Any) -> bool:
        raise NotImplementedError

    def convert(self, v: Any) -> Any:
        return v

    def check(self, v: Any, name: str) -> Any:
        if not self.accepts(v):
            raise ModelFormatError(f"{name} must be {self.want}, got {show_value(v)}")
        return self.convert(v)


@dataclass(frozen=True)
class Int(Spec):
    """A JSON integer (not a float, not a bool, not a string) in [lo, hi]."""
    lo: int
    hi: int

    @property
    def want(self) -> str:
        return f"an integer in [{self.lo}, {self.hi}]"

    def accepts(self, v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and self.lo <= v <= self.hi


@dataclass(frozen=True)
class Real(Spec):
    """A finite number > 0 and <= hi (an integer is taken as a float)."""
    hi: float = math.inf

    @property
    def want(self) -> str:
        return "a finite number > 0" if self.hi == math.inf else f"a number > 0 and <= {self.hi:g}"

    def accepts(self, v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        try:
            f = float(v)
        except OverflowError:
            return False
        return math.isfinite(f) and 0 < f <= self.hi

    def convert(self, v: Any) -> float:
        return float(v)


@dataclass(frozen=True)
class Flag(Spec):
    """true or false (not "yes", not 1)."""
    want = "true or false"

    def accepts(self, v: Any) -> bool:
        return isinstance(v, bool)


@dataclass(frozen=True)
class Obj(Spec):
    want = "an object"

    def accepts(self, v: Any) -> bool:
        return isinstance(v, Mapping)


@dataclass(frozen=True, eq=False)
class OneOf(Spec):
    """One of some names. A string not among them is an unsupported feature, not a format error."""
    choices: Any                   # a collection of str, read when checking (registries fill late)
    what: str | None = None        # what a choice is, if the field's name does not say it

    @property
    def want(self) -> str:
        return f"one of {', '.join(sorted(self.choices))}"

    def accepts(self, v: Any) -> bool:
        return isinstance(v, str) and v in self.choices

    def check(self, v: Any, name: str) -> Any:
        if isinstance(v, str) and v not in self.choices:
            subject = name if self.what is None else f"{name}: {self.what}"
            raise UnsupportedModelError(f"{subject} {show_value(v)} is not supported",
                                        hint=f"supported: {', '.join(sorted(self.choices))}")
        return super().check(v, name)


@dataclass(frozen=True)
class Maybe(Spec):
    """null, or a value of `inner`."""
    inner: Spec

    def check(self, v: Any, name: str) -> Any:
        return None if v is None else self.inner.check(v, name)


@dataclass(frozen=True)
class ListOf(Spec):
    """A list of at most max_len items, each checked by `item`; held as a tuple."""
    item: Spec
    max_len: int

    @property
    def want(self) -> str:
        return f"a list of at most {self.max_len} entries"

    def accepts(self, v: Any) -> bool:
        return isinstance(v, (list, tuple)) and len(v) <= self.max_len

    def check(self, v: Any, name: str) -> tuple[Any, ...]:
        super().check(v, name)
        return tuple(self.item.check(x, f"{name}[{i}]") for i, x in enumerate(v))


# ---- the configs ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"          # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 0     # llama3 only


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()   # per layer; None = full attention

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_windows"] = list(self.sliding_windows)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ArchConfig":
        """Read back `to_dict()` (an engine manifest's architecture), checked as config.json is."""
        where = MANIFEST_SECTION
        if not isinstance(d, Mapping):
            raise ModelFormatError(f"{where} must be an object, got {show_value(d)}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ModelFormatError(f"{where} has unknown keys {sorted(map(str, unknown))}")
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ModelFormatError(f"{where} lacks the field {missing[0]!r}")
        return cls(**_validate(d, where, {}))

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        norms = 2 * h + (2 * d if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + h


ArchParser = Callable[[Mapping[str, Any], int], dict[str, Any]]
ARCHITECTURES: Registry[ArchParser] = Registry("architecture")
ROPE_TYPES = ("default", "linear", "llama3")
ROPE_PARAMS = {"linear": ("factor",),       # what config.json must state for each rope type
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
LAYER_TYPES = ("full_attention", "sliding_attention")
WINDOW = Int(1, MAX_POSITIONS)

FIELDS: dict[str, Spec] = {            # ArchConfig field -> spec (rope: ROPE_FIELDS)
    "model_type": OneOf(ARCHITECTURES),
    "vocab_size": Int(1, MAX_VOCAB),
    "hidden_size": Int(1, MAX_HIDDEN),
    "intermediate_size": Int(1, MAX_INTERMEDIATE),
    "num_layers": Int(1, MAX_LAYERS),
    "num_heads": Int(1, MAX_HEADS),
    "num_kv_heads": Int(1, MAX_HEADS),
    "head_dim": Int(1, MAX_HEAD_DIM),
    "rms_norm_eps": Real(MAX_RMS_NORM_EPS),
    "max_position_embeddings": Int(1, MAX_POSITIONS),
    "tie_word_embeddings": Flag(),
    "qkv_bias": Flag(),
    "o_bias": Flag(),
    "mlp_bias": Flag(),
    "qk_norm": Flag(),
    "sliding_windows": ListOf(Maybe(WINDOW), MAX_LAYERS),
}
ROPE_FIELDS: dict[str, Spec] = {
    "theta": Real(),
    "rope_type": OneOf(ROPE_TYPES, what="rope type"),
    "factor": Real(),
    "low_freq_factor": Real(),
    "high_freq_factor": Real(),
    "original_max_positions": Int(0, MAX_POSITIONS),
}


def _validate(values: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    """The one check of an architecture: each ArchConfig field present in `values` against FIELDS
    (the rope dict against ROPE_FIELDS), then the rules between fields. Returns the values as
    ArchConfig holds them. `names` maps a field ("rope.theta" for rope's) to what `where` calls it."""
    def name(field: str) -> str:
        return names.get(field, field)

    out = {f: spec.check(values[f], f"{where}: {name(f)}") for f, spec in FIELDS.items() if f in values}
    if "rope" in values:
        rope = Obj().check(values["rope"], f"{where}: {name('rope')}")
        unknown = set(rope) - set(ROPE_FIELDS)
        if unknown:
            raise ModelFormatError(f"{where}: {name('rope')} has unknown keys {sorted(map(str, unknown))}")
        out["rope"] = RopeConfig(**{f: spec.check(rope[f], f"{where}: {name('rope.' + f)}")
                                    for f, spec in ROPE_FIELDS.items() if f in rope})
    if "num_heads" in out and "num_kv_heads" in out and out["num_heads"] % out["num_kv_heads"]:
        raise ModelFormatError(f"{where}: {name('num_heads')} {out['num_heads']} is not a multiple of "
                               f"{name('num_kv_heads')} {out['num_kv_heads']}")
    if out.get("head_dim", 0) % 2:
        raise ModelFormatError(f"{where}: {name('head_dim')} must be even (rotary embeddings rotate pairs), "
                               f"got {out['head_dim']}")
    if "sliding_windows" in out and "num_layers" in out and len(out["sliding_windows"]) != out["num_layers"]:
        raise ModelFormatError(f"{where}: {name('sliding_windows')} has {len(out['sliding_windows'])} entries "
                               f"for {out['num_layers']} layers ({name('num_layers')})")
    rope = out.get("rope")
    if rope is not None and rope.rope_type == "llama3":
        if rope.original_max_positions < 1:
            raise ModelFormatError(f"{where}: {name('rope.original_max_positions')} must be at least 1 "
                                   f"for llama3 rope, got {rope.original_max_positions}")
        if rope.high_freq_factor <= rope.low_freq_factor:
            raise ModelFormatError(f"{where}: {name('rope.high_freq_factor')} ({rope.high_freq_factor:g}) "
                                   f"must exceed {name('rope.low_freq_factor')} ({rope.low_freq_factor:g})")
    return out


# ---- config.json -----------------------------------------------------------------------------
def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """cfg[key], with null taken as absent (transformers writes `"sliding_window": null` for "not set")."""
    value = cfg.get(key)
    return default if value is None else value


def _read(cfg: Mapping[str, Any], key: str, spec: Spec, default: Any = None) -> Any:
    """A config.json field that is not an ArchConfig field, checked against `spec`."""
    value = cfg.get(key)
    return default if value is None else spec.check(value, f"{CONFIG_FILE}: {key}")


def register_architecture(model_type: str) -> Callable[[ArchParser], ArchParser]:
    """A parser gets the raw config dict and the (checked) number of layers, and returns the
    family-specific ArchConfig fields, unchecked: `parse_arch` validates them with the rest."""
    return ARCHITECTURES.decorator(model_type)


def _layer_windows(cfg: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Qwen-style sliding windows: `layer_types`, or use_sliding_window + max_window_layers."""
    types = _read(cfg, "layer_types", ListOf(OneOf(LAYER_TYPES), MAX_LAYERS))
    if types is None:
        sliding = _read(cfg, "use_sliding_window", Flag(), False)
        first = _read(cfg, "max_window_layers", Int(0, MAX_LAYERS), 0) if sliding else num_layers
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    window = _read(cfg, "sliding_window", WINDOW) if "sliding_attention" in types else None
    return tuple(window if t == "sliding_attention" else None for t in types)


@register_architecture("llama")
def _llama(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    bias = _get(cfg, "attention_bias", False)
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=_get(cfg, "mlp_bias", False))


@register_architecture("mistral")
def _mistral(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    return dict(sliding_windows=(_read(cfg, "sliding_window", WINDOW),) * num_layers)


@register_architecture("qwen2")
def _qwen2(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    return dict(qkv_bias=True, sliding_windows=_layer_windows(cfg, num_layers))


@register_architecture("qwen3")
def _qwen3(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    bias = _get(cfg, "attention_bias", False)
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=_layer_windows(cfg, num_layers))


# ArchConfig field -> (config.json key, default); REQUIRED fields have none, None ones are derived.
REQUIRED = object()
CONFIG_KEYS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", REQUIRED),
    "hidden_size": ("hidden_size", REQUIRED),
    "intermediate_size": ("intermediate_size", REQUIRED),
    "num_layers": ("num_hidden_layers", REQUIRED),
    "num_heads": ("num_attention_heads", REQUIRED),
    "num_kv_heads": ("num_key_value_heads", None),      # absent: num_attention_heads (no GQA)
    "head_dim": ("head_dim", None),                     # absent: hidden_size / num_attention_heads
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "max_position_embeddings": ("max_position_embeddings", 2048),
    "tie_word_embeddings": ("tie_word_embeddings", False),
}
CONFIG_NAMES = {**{f: key for f, (key, _) in CONFIG_KEYS.items()},
                "qkv_bias": "attention_bias", "o_bias": "attention_bias", "sliding_windows": "layer_types"}


def _rope_fields(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Both layouts: newer `rope_parameters` and the long-standing `rope_theta` + `rope_scaling`.
    Returns RopeConfig's fields (unchecked) and their names in config.json."""
    layouts = {k: _read(cfg, k, Obj()) for k in ("rope_parameters", "rope_scaling")}     # null: absent
    key = next((k for k, v in layouts.items() if v), None)
    params = layouts[key] if key is not None else {}
    names: dict[str, str] = {"rope": key or "rope_parameters"}

    def pick(field: str, *keys: str, top: bool = False) -> Any:
        """The first of `keys` set in the rope parameters (or, with `top`, at config.json's top level)."""
        for where, source in ((key, params), (None, cfg if top else {})):
            for k in keys:
                if source.get(k) is not None:
                    names["rope." + field] = k if where is None else f"{where}.{k}"
                    return source[k]
        return MISSING

    rope = {"theta": pick("theta", "rope_theta", top=True), "rope_type": pick("rope_type", "rope_type", "type")}
    partial = pick("partial", "partial_rotary_factor", top=True)
    if partial is not MISSING and Real().check(partial, f"{CONFIG_FILE}: {names['rope.partial']}") != 1.0:
        raise UnsupportedModelError(f"{CONFIG_FILE}: {names['rope.partial']} != 1 is not supported")
    for param in ROPE_PARAMS.get(rope["rope_type"], ()) if isinstance(rope["rope_type"], str) else ():
        field = "original_max_positions" if param == "original_max_position_embeddings" else param
        rope[field] = pick(field, param)
        if rope[field] is MISSING:
            raise ModelFormatError(f"{CONFIG_FILE}: rope type {rope['rope_type']!r} needs the parameter "
                                   f"{param!r} in {names['rope']}")
    return {f: v for f, v in rope.items() if v is not MISSING}, names


def parse_arch(cfg: Mapping[str, Any]) -> ArchConfig:
    """HF config.json (as a dict) -> ArchConfig. Unknown model types and features, and values of the
    wrong type or out of bounds, are clear errors naming the field; nothing is built before that."""
    where = CONFIG_FILE
    if not isinstance(cfg, Mapping):
        raise ModelFormatError(f"{where} must be a JSON object, got {show_value(cfg)}")
    model_type = FIELDS["model_type"].check(cfg.get("model_type"), f"{where}: model_type")
    _read(cfg, "hidden_act", OneOf(("silu", "swish")), "silu")
    rope, names = _rope_fields(cfg)
    names.update(CONFIG_NAMES)
    raw: dict[str, Any] = {"model_type": model_type, "rope": rope}
    for field, (key, default) in CONFIG_KEYS.items():
        if default is REQUIRED and key not in cfg:
            raise ModelFormatError(f"{where} lacks the field {key!r}")
        raw[field] = cfg[key] if default is REQUIRED else _get(cfg, key, default)
    if raw["num_kv_heads"] is None:
        raw["num_kv_heads"] = raw["num_heads"]
    if raw["head_dim"] is None:
        del raw["head_dim"]
    sane = _validate(raw, where, names)         # sizes are bounded before anything is built per layer
    if "head_dim" not in raw:
        hidden, heads = sane["hidden_size"], sane["num_heads"]
        if hidden % heads:
            raise ModelFormatError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads "
                                   f"{heads}", hint="state head_dim explicitly if the model has one")
        raw["head_dim"] = hidden // heads
    n = sane["num_layers"]
    family = {"sliding_windows": (None,) * n, **ARCHITECTURES[model_type](cfg, n)}
    return ArchConfig(**_validate({**raw, **family}, where, names))
