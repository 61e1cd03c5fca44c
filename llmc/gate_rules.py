"""A profile's [gate] table: the tolerance of each metric, and how sure a verdict must be (llmc.gate)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmc.errors import ConfigError

GATE_KEYS = {"confidence": (float,), "resamples": (int,), "min_samples": (int,), "seed": (int,),
             "default_tolerance": (float, int), "metrics": (dict,)}


@dataclass(frozen=True)
class Rule:
    tolerance: float                 # how much worse is still fine (a fraction when relative)
    relative: bool = True
    required: bool = False           # absent from the results (or the baseline): a usage error


@dataclass(frozen=True)
class GateConfig:
    confidence: float = 0.95
    resamples: int = 2000
    min_samples: int = 10
    seed: int = 0
    default: Rule | None = Rule(0.05)    # a metric with a direction and no rule of its own; None: not gated
    rules: dict[str, Rule] = field(default_factory=dict)     # by metric name, or its name before '@'

    def rule(self, metric: str) -> Rule | None:
        return self.rules.get(metric) or self.rules.get(metric.split("@")[0]) or self.default


RULE_KEYS = {"tolerance": (float, int), "relative": (bool,), "required": (bool,)}


def _typed(value, types) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def gate_config(table: dict[str, Any], where: str = "the [gate] table") -> GateConfig:
    """A [gate] table (a profile's) as a GateConfig; a bad key or value is a one-line error naming it.

        [gate]
        confidence = 0.95          # of the bootstrap interval
        resamples = 2000
        min_samples = 10           # fewer records than this: inconclusive
        default_tolerance = 0.05   # relative, for metrics with no rule; 0: such metrics are not gated
        [gate.metrics]
        perplexity = { tolerance = 0.02, relative = true, required = true }
    """
    keys = GATE_KEYS
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where}: no key {key!r}; known: {', '.join(keys)}")
        if not _typed(value, keys[key]):
            raise ConfigError(f"{where}: {key} must be {' or '.join(t.__name__ for t in keys[key])}, got {value!r}")
    conf, resamples = table.get("confidence", 0.95), table.get("resamples", 2000)
    if not 0.5 <= conf < 1:
        raise ConfigError(f"{where}: confidence must be in [0.5, 1), got {conf}")
    if resamples < 100 or table.get("min_samples", 10) < 2:
        raise ConfigError(f"{where}: resamples must be at least 100 and min_samples at least 2")
    rules = {}
    for name, spec in table.get("metrics", {}).items():
        if not isinstance(spec, dict) or "tolerance" not in spec:
            raise ConfigError(f"{where}: metrics.{name} must be a table with a tolerance, e.g. "
                              f"{{ tolerance = 0.02, relative = true }}")
        for key, value in spec.items():
            if key not in RULE_KEYS or not _typed(value, RULE_KEYS[key]):
                raise ConfigError(f"{where}: metrics.{name}.{key} is unknown or of the wrong type ({value!r}); "
                                  f"known: tolerance (number), relative, required (true/false)")
        if spec["tolerance"] < 0:
            raise ConfigError(f"{where}: metrics.{name}.tolerance must be at least 0, got {spec['tolerance']}")
        rules[name] = Rule(float(spec["tolerance"]), spec.get("relative", True), spec.get("required", False))
    default = table.get("default_tolerance", 0.05)
    if default < 0:
        raise ConfigError(f"{where}: default_tolerance must be at least 0, got {default}")
    return GateConfig(confidence=conf, resamples=resamples, min_samples=table.get("min_samples", 10),
                      seed=table.get("seed", 0), default=Rule(float(default)) if default else None, rules=rules)
