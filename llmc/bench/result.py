"""The one result schema every `llmc bench` verb writes with `--json FILE`, and reading it back.

    {
      "producer": "llmc 0.1.0",
      "schema":   "llmc.bench.result/1",
      "kind":     "quality" | "throughput" | "serve",
      "model":    {"path", "sha256", "recipe", ...},      # sha256 of the engine's manifest or the config.json
      "env":      {...},                                  # llmc.bench.environment.environment()
      "config":   {...},                                  # every option, and how the inputs were made
      "metrics":  {NAME: {"value", "unit", "direction", "statistic", "samples", "of"}},
      "samples":  {GROUP: [{"id"?, FIELD: value, ...}, ...]},
      "details":  {...}                                   # what else the bench knows (backend, server, ...)
    }

A metric's `value` is `statistic` (a name in llmc.bench.stats.STATISTICS) applied to the fields
`of` of the records in `samples[GROUP]`, so any verdict can be recomputed from the file; a metric
with `statistic` None is one exact value (a size on disk, a token count). `direction` is "higher"
or "lower" (which way is better) or None (informational: never gated). Records with an `id` are
the same unit of work in every run with the same protocol (a window of the same tokens), so two
results over the same ids are compared pair by pair.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.errors import ConfigError

SCHEMA = "llmc.bench.result/1"
BASELINE_SCHEMA = "llmc.bench.baseline/1"        # several results in one file (llmc gate --update-baseline)
KINDS = ("quality", "throughput", "serve")
DIRECTIONS = ("higher", "lower", None)

# What two results of a kind must share to be compared: the protocol, not the model.
PROTOCOL = {
    "quality": ("protocol", "text_sha256", "seqlen", "max_tokens", "reference_sha256", "kl"),
    "throughput": ("input_len", "output_len", "against_kind"),
    "serve": ("input_len", "output_len", "concurrency", "request_rate", "dataset_sha256"),
}


@dataclass(frozen=True)
class Metric:
    value: float | int | None
    unit: str
    direction: str | None              # "higher" | "lower" | None: informational
    statistic: str | None = None       # llmc.bench.stats.STATISTICS name; None: one exact value
    samples: str | None = None         # the group of records it comes from
    of: tuple[str, ...] = ()           # the fields of those records it reads

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "direction": self.direction, "statistic": self.statistic,
                "samples": self.samples, "of": list(self.of)}


def sampled(statistic: str, group: str, of: tuple[str, ...] | str, samples: dict[str, list[dict]], unit: str,
            direction: str | None) -> Metric:
    """A metric computed from records (its value is the statistic of them, as the gate computes it)."""
    from llmc.bench.stats import compute

    of = (of,) if isinstance(of, str) else tuple(of)
    value = compute(statistic, samples[group], of)
    return Metric(value=value, unit=unit, direction=direction, statistic=statistic, samples=group, of=of)


def exact(value: float | int | None, unit: str, direction: str | None = None) -> Metric:
    return Metric(value=value, unit=unit, direction=direction)


@dataclass(frozen=True)
class BenchResult:
    kind: str
    model: dict[str, Any]
    env: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Metric]
    samples: dict[str, list[dict[str, Any]]]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The result file's content (llmc.io.stamp_json adds the producer)."""
        return {"schema": SCHEMA, "kind": self.kind, "model": self.model, "env": self.env, "config": self.config,
                "metrics": {k: m.to_json() for k, m in self.metrics.items()}, "samples": self.samples,
                "details": self.details}


# ---------------------------------------------------------------------------------------------
# What a result says about the model

def model_identity(path: Path | str) -> dict[str, Any]:
    """path, sha256 (of the engine's manifest, else the checkpoint's config.json: the files that
    name every weight's checksum or the recipe) and the quantization recipe (None: not quantized)."""
    from llmc.engine import ENGINE_FILE

    p = Path(path)
    ident = next((p / name for name in (ENGINE_FILE, "config.json") if (p / name).is_file()), None)
    if ident is None:
        return {"path": str(path), "sha256": None, "sha256_of": None, "recipe": None}
    raw = ident.read_bytes()                  # hashed and parsed from the one read
    digest = hashlib.sha256(raw).hexdigest()
    section = "quantization" if ident.name == ENGINE_FILE else "quantization_config"
    try:
        recipe = (json.loads(raw).get(section) or {}).get("recipe")
    except (ValueError, AttributeError):
        recipe = None
    return {"path": str(path), "sha256": digest, "sha256_of": ident.name, "recipe": recipe}


# ---------------------------------------------------------------------------------------------
# Reading

def _fail(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path}: {why}")


def check_result(obj: Any, path: Path) -> dict[str, Any]:
    """`obj` (a parsed file) as a result of this schema, or a one-line error naming what is wrong."""
    if not isinstance(obj, dict):
        raise _fail(path, "not an llmc bench result (not a JSON object)")
    schema = obj.get("schema")
    if schema != SCHEMA:
        old = isinstance(schema, str) and schema.startswith("llmc.bench.")
        raise _fail(path, f"not an llmc bench result of schema {SCHEMA} (schema: {schema!r})" +
                    ("; rerun the bench with this llmc" if old else ""))
    if obj.get("kind") not in KINDS:
        raise _fail(path, f"unknown kind {obj.get('kind')!r}; known: {', '.join(KINDS)}")
    for key, kind in (("model", dict), ("config", dict), ("metrics", dict), ("samples", dict)):
        if not isinstance(obj.get(key), kind):
            raise _fail(path, f"'{key}' is missing or not an object")
    for name, m in obj["metrics"].items():
        if not isinstance(m, dict) or "value" not in m or m.get("direction") not in DIRECTIONS:
            raise _fail(path, f"metric {name!r} lacks a value or has an unknown direction")
        group = m.get("samples")
        if m.get("statistic") is not None:
            from llmc.bench.stats import STATISTICS
            if m["statistic"] not in STATISTICS:
                raise _fail(path, f"metric {name!r} has an unknown statistic {m['statistic']!r}")
            if not isinstance(obj["samples"].get(group), list):
                raise _fail(path, f"metric {name!r} comes from samples {group!r}, which the file lacks")
    return obj


def read_json(path: Path | str, what: str = "result file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such {what}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: {what} is unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None


def load_result(path: Path | str) -> dict[str, Any]:
    """A result file, checked."""
    return check_result(read_json(path), Path(path))


def load_results(path: Path | str) -> list[dict[str, Any]]:
    """A result file, or a baseline file holding several: the results in it, checked."""
    p = Path(path)
    obj = read_json(p)
    if isinstance(obj, dict) and obj.get("schema") == BASELINE_SCHEMA:
        items = obj.get("results")
        if not isinstance(items, list) or not items:
            raise _fail(p, "a baseline with no results")
        return [check_result(r, p) for r in items]
    return [check_result(obj, p)]


def baseline_json(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What `llmc gate --update-baseline` writes: the one result as it is, or several bundled."""
    if len(results) == 1:
        return {k: v for k, v in results[0].items() if k != "producer"}
    return {"schema": BASELINE_SCHEMA, "results": [{k: v for k, v in r.items() if k != "producer"} for r in results]}


def protocol_mismatch(baseline: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why two results of one kind cannot be compared (the first protocol key they differ in), or None."""
    for key in PROTOCOL[baseline["kind"]]:
        a, b = baseline["config"].get(key), current["config"].get(key)
        if a != b:
            return f"{key} {a!r} in the baseline, {b!r} here"
    return None
