"""Architecture configs: a Hugging Face config.json normalised into one frozen `ArchConfig`.

Each supported `model_type` registers a parser that states how its family differs (biases,
q/k norms, sliding windows). Everything downstream reads `ArchConfig`, never the raw dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

from llmc.errors import ModelFormatError, UnsupportedModelError


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
    def from_dict(cls, d: Mapping[str, Any]) -> "ArchConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelFormatError(f"architecture config has unknown keys {sorted(unknown)}")
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["sliding_windows"] = tuple(d.get("sliding_windows", ()))
        return cls(**d)

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        norms = 2 * h + (2 * d if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + h


ArchParser = Callable[[Mapping[str, Any]], dict[str, Any]]
ARCHITECTURES: dict[str, ArchParser] = {}


def register_architecture(model_type: str) -> Callable[[ArchParser], ArchParser]:
    """A parser returns the family-specific fields of ArchConfig from the raw config dict."""
    def add(fn: ArchParser) -> ArchParser:
        if model_type in ARCHITECTURES:
            raise ValueError(f"architecture {model_type!r} is registered twice")
        ARCHITECTURES[model_type] = fn
        return fn
    return add


def _layer_windows(cfg: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Qwen-style sliding windows: `layer_types`, or use_sliding_window + max_window_layers."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if window is not None and i >= cfg.get("max_window_layers", 0)
                 else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ModelFormatError(f"layer_types has {len(types)} entries for {num_layers} layers")
    bad = set(types) - {"full_attention", "sliding_attention"}
    if bad:
        raise UnsupportedModelError(f"unsupported layer_types {sorted(bad)}")
    if "sliding_attention" in types and window is None:
        window = cfg.get("sliding_window")
    return tuple(window if t == "sliding_attention" else None for t in types)


@register_architecture("llama")
def _llama(cfg: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(cfg.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))


@register_architecture("mistral")
def _mistral(cfg: Mapping[str, Any]) -> dict[str, Any]:
    window = cfg.get("sliding_window")
    return dict(sliding_windows=tuple(window for _ in range(int(cfg["num_hidden_layers"]))))


@register_architecture("qwen2")
def _qwen2(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return dict(qkv_bias=True, sliding_windows=_layer_windows(cfg, int(cfg["num_hidden_layers"])))


@register_architecture("qwen3")
def _qwen3(cfg: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(cfg.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True,
                sliding_windows=_layer_windows(cfg, int(cfg["num_hidden_layers"])))


ROPE_TYPES = ("default", "linear", "llama3")


def parse_rope(cfg: Mapping[str, Any]) -> RopeConfig:
    """Both layouts: newer `rope_parameters` and the long-standing `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ModelFormatError(f"rope parameters must be an object, got {params!r}")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported",
                                    hint=f"supported: {', '.join(ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    try:
        if rope_type == "linear":
            return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
        return RopeConfig(theta=theta, rope_type="llama3", factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_positions=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ModelFormatError(f"rope type {rope_type!r} needs the parameter {e.args[0]!r}") from None


def parse_arch(cfg: Mapping[str, Any]) -> ArchConfig:
    """HF config.json (as a dict) -> ArchConfig. Unknown model types and features are clear errors."""
    model_type = cfg.get("model_type")
    parser = ARCHITECTURES.get(model_type)  # type: ignore[arg-type]
    if parser is None:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; "
                                    f"supported: {', '.join(sorted(ARCHITECTURES))}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        kv = cfg.get("num_key_value_heads")
        family = parser(cfg)
        arch = ArchConfig(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv) if kv is not None else heads,
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope=parse_rope(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            **family,
        )
    except KeyError as e:
        raise ModelFormatError(f"config.json lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"config.json has a bad value: {e}") from None
    if not arch.sliding_windows:
        arch = ArchConfig.from_dict({**arch.to_dict(), "sliding_windows": [None] * arch.num_layers})
    if arch.num_heads % arch.num_kv_heads:
        raise ModelFormatError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return arch
