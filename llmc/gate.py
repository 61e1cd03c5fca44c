"""`gate`: compare bench results with a baseline and give each metric a verdict a CI job can trust.

For each metric of each baseline result that has a direction: the rule of the profile's [gate]
table (tolerance, relative or absolute, required or not) and a statistical verdict. The change is
current - baseline (absolute) or current / baseline - 1 (relative), with a bootstrap interval from
the records both results keep (llmc.bench.stats; paired when they hold the same windows). Counting
a change toward "worse" as positive:

    regressed     the whole interval lies beyond the tolerance (worse by more than it allows)
    improved      the whole interval lies beyond the tolerance on the better side
    unchanged     the interval reaches no further toward worse than the tolerance
    inconclusive  the interval straddles the tolerance, or either run has fewer than min_samples
                  records: the verdict says about how many would settle it

A metric of one exact value (a size on disk) has no interval: its change is compared as it is.
Only "regressed" fails the gate (exit 1); files that cannot be compared, or a required metric that
is missing, are a usage error (exit 2).

Results are matched to the baseline's by kind, in order: the first quality result given with the
baseline's first quality result, and so on.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmc.bench.result import load_results, protocol_mismatch
from llmc.bench.stats import Change, bootstrap_change, change_of
from llmc.gate_rules import GateConfig, Rule, gate_config
from llmc.errors import ConfigError

VERDICTS = ("regressed", "improved", "unchanged", "inconclusive", "missing", "not gated")


def config_from_profile(profile: str | None) -> GateConfig:
    if profile is None:
        return GateConfig()
    from llmc.profiles import load_profile

    p = load_profile(profile)
    return gate_config(p.section("gate"), where=f"{p.path}: [gate]")


@dataclass(frozen=True)
class Verdict:
    kind: str                        # the result's kind
    metric: str
    verdict: str                     # one of VERDICTS
    unit: str
    direction: str | None
    baseline: float | None
    current: float | None
    change: float | None             # current - baseline, or current / baseline - 1 when relative
    low: float | None                # the interval of the change
    high: float | None
    tolerance: float | None
    relative: bool
    samples: int | None              # records behind the smaller run (pairs when paired); None: one exact value
    paired: bool
    needed: int | None               # about how many records would settle an inconclusive verdict
    reason: str                      # one line: why this verdict

    @property
    def failed(self) -> bool:
        return self.verdict == "regressed"


def _fmt(x: float, relative: bool) -> str:
    return f"{100 * x:+.2f}%" if relative else f"{x:+.4g}"


def describe(v: Verdict) -> str:
    """The change and its interval in one phrase: '+12.31% (CI +10.02% … +14.77%)'."""
    if v.change is None:
        return "-"
    text = _fmt(v.change, v.relative)
    if v.low is not None and v.samples is not None:
        text += f" (CI {_fmt(v.low, v.relative)} … {_fmt(v.high, v.relative)})"
    return text


def judge(change: Change | None, exact: tuple[float, float] | None, rule: Rule, direction: str, cfg: GateConfig,
          kind: str, metric: str, unit: str) -> Verdict:
    """The verdict of one metric from its bootstrap change (or its exact values)."""
    worse = 1 if direction == "lower" else -1         # a change in this sign is worse
    t = rule.tolerance
    base = dict(kind=kind, metric=metric, unit=unit, direction=direction, tolerance=t, relative=rule.relative)
    if exact is not None:
        b, c = exact
        d = change_of(b, c, rule.relative)
        w = worse * d
        verdict = "regressed" if w > t else "improved" if w < -t else "unchanged"
        return Verdict(**base, verdict=verdict, baseline=b, current=c, change=d, low=None, high=None, samples=None,
                       paired=False, needed=None, reason=f"one exact value: {_fmt(d, rule.relative)} against a "
                       f"tolerance of {_fmt(t, rule.relative).lstrip('+')}")
    assert change is not None
    lo, hi = sorted((worse * change.low, worse * change.high))
    point = worse * change.change
    common = dict(**base, baseline=change.baseline, current=change.current, change=change.change, low=change.low,
                  high=change.high, samples=change.samples, paired=change.paired)
    tol = _fmt(t, rule.relative).lstrip("+")
    if change.samples < cfg.min_samples:
        return Verdict(**common, verdict="inconclusive", needed=cfg.min_samples,
                       reason=f"{change.samples} samples, fewer than the {cfg.min_samples} a verdict needs")
    if lo > t:
        return Verdict(**common, verdict="regressed", needed=None,
                       reason=f"worse by more than the tolerance of {tol} over the whole interval")
    if hi < -t:
        return Verdict(**common, verdict="improved", needed=None,
                       reason=f"better by more than the tolerance of {tol} over the whole interval")
    if hi <= t:
        return Verdict(**common, verdict="unchanged", needed=None, reason=f"within the tolerance of {tol}")
    half, distance = (hi - lo) / 2, abs(point - t)
    needed = math.ceil(change.samples * (half / distance) ** 2) if distance > 0 and half > 0 else None
    if needed is not None and needed >= 10 ** 7:
        needed = None
    more = (f"about {needed} samples would settle it" if needed is not None else
            "the change sits on the tolerance: more samples would not settle it")
    return Verdict(**common, verdict="inconclusive", needed=needed,
                   reason=f"the interval straddles the tolerance of {tol}; {more}")


def _skip(kind: str, metric: str, m: dict, verdict: str, reason: str, rule: Rule | None,
          current: float | None = None) -> Verdict:
    return Verdict(kind=kind, metric=metric, verdict=verdict, unit=m.get("unit", ""), direction=m.get("direction"),
                   baseline=m.get("value"), current=current, change=None, low=None, high=None,
                   tolerance=rule.tolerance if rule else None, relative=rule.relative if rule else True, samples=None,
                   paired=False, needed=None, reason=reason)


def compare(baseline: dict[str, Any], current: dict[str, Any], cfg: GateConfig, where: str) -> list[Verdict]:
    """The verdicts of one result against its baseline."""
    kind = baseline["kind"]
    why = protocol_mismatch(baseline, current)
    if why is not None:
        raise ConfigError(f"{where}: not measured as the baseline was ({why})")
    bm, cm = baseline["metrics"], current["metrics"]
    out = []
    for name, m in bm.items():
        if m.get("direction") is None:
            continue
        rule = cfg.rule(name)
        if name not in cm or cm[name].get("value") is None:
            if rule is not None and rule.required:
                raise ConfigError(f"{where}: the required metric {name} is missing (the baseline has it)")
            out.append(_skip(kind, name, m, "missing", "in the baseline, not in this result", rule))
            continue
        c = cm[name]
        if rule is None:
            out.append(_skip(kind, name, m, "not gated", "no rule in the profile, and no default tolerance", None,
                             c.get("value")))
            continue
        if m.get("statistic") is None or c.get("statistic") is None:
            if m.get("value") is None:
                out.append(_skip(kind, name, m, "missing", "the baseline has no value", rule, c.get("value")))
                continue
            out.append(judge(None, (m["value"], c["value"]), rule, m["direction"], cfg, kind, name, m["unit"]))
            continue
        if (m["statistic"], m["of"]) != (c["statistic"], c["of"]):
            raise ConfigError(f"{where}: metric {name} is computed differently from the baseline's "
                              f"({c['statistic']} of {c['of']}, the baseline {m['statistic']} of {m['of']})")
        change = bootstrap_change(m["statistic"], m["of"], baseline["samples"][m["samples"]],
                                  current["samples"][c["samples"]], rule.relative, cfg.confidence, cfg.resamples,
                                  cfg.seed)
        if change is None:
            out.append(_skip(kind, name, m, "inconclusive", "no usable samples", rule, c.get("value")))
            continue
        out.append(judge(change, None, rule, m["direction"], cfg, kind, name, m["unit"]))
    return out


@dataclass(frozen=True)
class GateReport:
    verdicts: list[Verdict]
    results: list[str]               # the files compared
    baseline: str
    profile: str | None
    config: GateConfig

    @property
    def regressed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.failed]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressed else 0

    def counts(self) -> dict[str, int]:
        return {k: sum(v.verdict == k for v in self.verdicts) for k in VERDICTS}

    def to_json(self) -> dict[str, Any]:
        return {"schema": "llmc.gate/1", "baseline": self.baseline, "results": self.results, "profile": self.profile,
                "config": asdict(self.config), "passed": not self.regressed, "counts": self.counts(),
                "verdicts": [{**asdict(v), "summary": describe(v)} for v in self.verdicts]}


def pair_results(baseline: list[dict], current: list[tuple[str, dict]], baseline_path: str) -> list[tuple[dict, dict, str]]:
    """Each baseline result with the current result of its kind and rank; a usage error when they differ."""
    def kinds(items):
        return sorted(r["kind"] for r in items)
    if kinds(baseline) != kinds(r for _, r in current):
        have = ", ".join(kinds(r for _, r in current)) or "none"
        raise ConfigError(f"the results ({have}) do not match the baseline {baseline_path} "
                          f"({', '.join(kinds(baseline))}): give one result per baseline result, of the same kind")
    pairs = []
    for kind in dict.fromkeys(r["kind"] for r in baseline):
        mine = [r for r in baseline if r["kind"] == kind]
        theirs = [(p, r) for p, r in current if r["kind"] == kind]
        pairs += [(b, c, p) for b, (p, c) in zip(mine, theirs)]
    return pairs


def gate(results: list[Path | str], baseline: Path | str, profile: str | None = None,
         config: GateConfig | None = None) -> GateReport:
    """Compare the result files with the baseline file (a result, or several bundled) under the
    profile's [gate] table (or `config`); see the module docstring."""
    if not results:
        raise ConfigError("give at least one result file")
    cfg = config or config_from_profile(profile)
    current = [(str(p), r) for p in results for r in load_results(p)]
    base = load_results(baseline)
    for name, rule in cfg.rules.items():
        if rule.required and not any(k == name or k.split("@")[0] == name for b in base for k in b["metrics"]):
            raise ConfigError(f"{baseline}: the baseline lacks the required metric {name}")
    verdicts = []
    for b, c, where in pair_results(base, current, str(baseline)):
        verdicts += compare(b, c, cfg, where)
    return GateReport(verdicts=verdicts, results=[str(p) for p in results], baseline=str(baseline), profile=profile,
                      config=cfg)


def update_baseline(results: list[Path | str], baseline: Path | str) -> int:
    """Write the results as the new baseline (atomically; a file there that llmc did not write is
    refused). Returns how many results it holds."""
    from llmc.bench.result import baseline_json
    from llmc.io import write_result_json

    if not results:
        raise ConfigError("give at least one result file")
    items = [r for p in results for r in load_results(p)]
    write_result_json(Path(baseline), baseline_json(items), inputs=[])
    return len(items)
