"""Quantization schemes as frozen dataclasses, one axis each: the number format (`TensorQuant`),
what is quantized (`QuantScheme`) and how the numbers are found (`QuantRecipe`: the algorithm,
calibration). The kernel that runs a format is a third, separate axis (registered by format)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from llmc.errors import ConfigError, OptionError
from llmc.quantized.formats import TensorQuant


@dataclass(frozen=True, kw_only=True)
class QuantScheme:                                     # what the numbers are
    name: str
    weight: TensorQuant
    activation: TensorQuant | None = None              # None means weight-only
    skip: tuple[str, ...] = ("lm_head.weight", "model.embed_tokens.weight")   # fnmatch patterns

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight.to_dict(),
                "activation": self.activation.to_dict() if self.activation else None, "skip": list(self.skip)}


@dataclass(frozen=True, kw_only=True)
class QuantRecipe:                                     # how we get there
    scheme: QuantScheme
    algorithm: Literal["rtn", "gptq", "awq", "smoothquant"] = "rtn"
    kv_cache: TensorQuant | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    smooth_alpha: float = 0.5                          # SmoothQuant's migration strength
    awq_clip: bool = True                              # AWQ: also search each group's clipping range
    weight_observer: str = "minmax"                    # the range weight scales cover (observers.py)
    act_observer: str = "minmax"                       # ... static input scales and KV-cache scales cover
    percentile: float = 99.99                          # for the percentile observer

    def __post_init__(self) -> None:
        if not 0 <= self.smooth_alpha <= 1:
            raise OptionError("alpha", f"the SmoothQuant migration strength must be in [0, 1], got {self.smooth_alpha}")
        if self.calib_samples < 1:
            raise OptionError("calib_samples", f"must be at least 1, got {self.calib_samples}")
        if self.calib_seqlen < 2:
            raise OptionError("calib_seqlen", f"must be at least 2 tokens, got {self.calib_seqlen}")


    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme.to_dict(), "algorithm": self.algorithm,
                "kv_cache": self.kv_cache.to_dict() if self.kv_cache else None,
                "calib_samples": self.calib_samples, "calib_seqlen": self.calib_seqlen,
                "smooth_alpha": self.smooth_alpha, "awq_clip": self.awq_clip,
                "weight_observer": self.weight_observer, "act_observer": self.act_observer,
                "percentile": self.percentile}


W8A16 = QuantScheme(name="w8a16", weight=TensorQuant(dtype="int8", granularity="channel"))
W4A16 = QuantScheme(name="w4a16", weight=TensorQuant(dtype="int4", granularity="group", group_size=128))
W8A8 = QuantScheme(name="w8a8", weight=TensorQuant(dtype="int8", granularity="channel"),
                   activation=TensorQuant(dtype="int8", granularity="token"))
FP8 = QuantScheme(name="fp8", weight=TensorQuant(dtype="fp8_e4m3", granularity="channel"),
                  activation=TensorQuant(dtype="fp8_e4m3", granularity="tensor"))
SCHEMES = {s.name: s for s in (W8A16, W4A16, W8A8, FP8)}


def resolve_scheme(name: str, group_size: int | None = None, symmetric: bool | None = None) -> QuantScheme:
    """A named scheme with the command line's overrides, derived (never mutated)."""
    if name not in SCHEMES:
        raise OptionError("scheme", f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")
    scheme = SCHEMES[name]
    w = scheme.weight
    if group_size is not None:
        if w.granularity != "group":
            raise OptionError("group_size", f"applies to group-wise schemes (w4a16), not {name}")
        w = replace(w, group_size=group_size)
    if symmetric is not None and symmetric != w.symmetric:
        if w.dtype != "int4":
            raise OptionError("asymmetric", f"applies to int4 weights (w4a16), not {name}")
        w = replace(w, symmetric=symmetric)
    return replace(scheme, weight=w)


QUANTIZE_OPTION_DEFAULTS: dict[str, Any] = dict(
    algo="rtn", group_size=None, asymmetric=False, kv_cache=None, calib_samples=128, calib_seqlen=512, alpha=0.5,
    awq_clip=True, observer="minmax", act_observer="minmax", percentile=99.99)
KV_CACHE_DTYPES = {"int8": "int8", "fp8": "fp8_e4m3"}


def recipe_from_options(scheme: str | None, **options: Any) -> QuantRecipe:
    """A recipe from `llmc quantize`'s option names (as a profile's [quantize] table spells them);
    options left out or None take QUANTIZE_OPTION_DEFAULTS."""
    o = {**QUANTIZE_OPTION_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    unknown = set(o) - set(QUANTIZE_OPTION_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown quantize option(s): {', '.join(sorted(unknown))}")
    if scheme is None:
        raise ConfigError("missing --scheme", hint="give --scheme w8a16|w4a16|w8a8|fp8, or a --profile that sets it")
    kv = None
    if o["kv_cache"] is not None:
        if o["kv_cache"] not in KV_CACHE_DTYPES:
            raise OptionError("kv_cache", f"unknown KV-cache format {o['kv_cache']!r}; choose int8 or fp8")
        kv = TensorQuant(dtype=KV_CACHE_DTYPES[o["kv_cache"]], granularity="channel")
    return QuantRecipe(scheme=resolve_scheme(scheme, o["group_size"], False if o["asymmetric"] else None),
                       algorithm=o["algo"], kv_cache=kv, calib_samples=o["calib_samples"],
                       calib_seqlen=o["calib_seqlen"], smooth_alpha=float(o["alpha"]), awq_clip=o["awq_clip"],
                       weight_observer=o["observer"], act_observer=o["act_observer"],
                       percentile=float(o["percentile"]))
