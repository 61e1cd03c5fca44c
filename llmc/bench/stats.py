"""How a metric's value follows from its records, and the bootstrap of a change between two runs.

A statistic reads one or two fields of a group of records (llmc.bench.result): `mean`, `median`
and the percentiles of one field; `ratio` (sum of the first over sum of the second: KL divergence
per token from per-window sums) and `exp_ratio` (its exponential: perplexity from per-window NLL
sums and token counts). A field may hold a list per record (a request's inter-token gaps): the
statistic then reads all of them, and a bootstrap resamples whole records (a cluster bootstrap).

The bootstrap draws records with replacement `resamples` times (from a fixed seed, so a verdict
is reproducible) and returns the percentile interval of the change. Paired: when both runs hold
the same record ids (the same windows of the same text), one draw of ids serves both, so what the
windows share cancels and only the change between the models is left.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

Records = Sequence[dict[str, Any]]


def _percentile(q: float) -> Callable[[list[np.ndarray]], np.ndarray]:
    return lambda xs: np.percentile(xs[0], q, axis=-1)


# name -> (fields read, f over arrays of shape (..., n) -> (...))
STATISTICS: dict[str, tuple[int, Callable[[list[np.ndarray]], np.ndarray]]] = {
    "mean": (1, lambda xs: xs[0].mean(axis=-1)),
    "median": (1, lambda xs: np.median(xs[0], axis=-1)),
    "p50": (1, _percentile(50)),
    "p90": (1, _percentile(90)),
    "p99": (1, _percentile(99)),
    "ratio": (2, lambda xs: xs[0].sum(axis=-1) / xs[1].sum(axis=-1)),
    "exp_ratio": (2, lambda xs: np.exp(xs[0].sum(axis=-1) / xs[1].sum(axis=-1))),
}


def usable(records: Records, of: Sequence[str]) -> list[dict[str, Any]]:
    """The records that carry every field (failed requests carry no latency)."""
    return [r for r in records if all(r.get(f) is not None for f in of)]


def _flat(records: Records, of: Sequence[str]) -> list[np.ndarray]:
    """Each field over the records, list fields concatenated."""
    out = []
    for f in of:
        vals = [r[f] for r in records]
        if vals and isinstance(vals[0], list):
            vals = [v for vs in vals for v in vs]
        out.append(np.asarray(vals, dtype=np.float64))
    return out


def compute(statistic: str, records: Records, of: Sequence[str]) -> float | None:
    """The statistic over the records (None when no record carries its fields)."""
    n_fields, f = STATISTICS[statistic]
    if len(of) != n_fields:
        raise ValueError(f"statistic {statistic} reads {n_fields} fields, got {list(of)}")
    rows = usable(records, of)
    xs = _flat(rows, of)
    if not rows or xs[0].size == 0:
        return None
    return float(f(xs))


def _has_lists(records: Records, of: Sequence[str]) -> bool:
    return bool(records) and any(isinstance(records[0][f], list) for f in of)


def _resampled(statistic: str, records: Records, of: Sequence[str], picks: np.ndarray) -> np.ndarray:
    """The statistic of each draw: `picks` (draws, n) indexes the records."""
    f = STATISTICS[statistic][1]
    if not _has_lists(records, of):
        xs = [a[picks] for a in _flat(records, of)]
        return f(xs)
    out = np.empty(len(picks))
    for i, row in enumerate(picks):                  # a cluster bootstrap: whole records, then their lists
        out[i] = f(_flat([records[j] for j in row], of))
    return out


@dataclass(frozen=True)
class Change:
    baseline: float
    current: float
    change: float                 # current - baseline, or current / baseline - 1 when relative
    low: float                    # the interval of the change
    high: float
    samples: int                  # records behind the smaller of the two runs (pairs when paired)
    paired: bool


def change_of(baseline: float, current: float, relative: bool) -> float:
    if relative:
        return current / baseline - 1 if baseline else (0.0 if current == baseline else float("inf"))
    return current - baseline


def bootstrap_change(statistic: str, of: Sequence[str], baseline: Records, current: Records, relative: bool,
                     confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Change | None:
    """The change of the statistic from `baseline` to `current` records with its bootstrap interval;
    None when either has no usable record."""
    a, b = usable(baseline, of), usable(current, of)
    if not a or not b:
        return None
    base, cur = compute(statistic, a, of), compute(statistic, b, of)
    if base is None or cur is None:
        return None
    rng = np.random.default_rng(seed)
    ids_a, ids_b = [r.get("id") for r in a], [r.get("id") for r in b]
    paired = None not in ids_a and len(set(ids_a)) == len(ids_a) and sorted(map(str, ids_a)) == sorted(map(str, ids_b))
    if paired:
        order = {str(r["id"]): r for r in b}
        b = [order[str(r["id"])] for r in a]                   # the same unit of work at the same index
        picks = rng.integers(0, len(a), size=(resamples, len(a)))
        sa, sb = _resampled(statistic, a, of, picks), _resampled(statistic, b, of, picks)
    else:
        sa = _resampled(statistic, a, of, rng.integers(0, len(a), size=(resamples, len(a))))
        sb = _resampled(statistic, b, of, rng.integers(0, len(b), size=(resamples, len(b))))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = sb / sa - 1 if relative else sb - sa
    d = d[np.isfinite(d)]
    tail = (1 - confidence) / 2
    low, high = (float(np.quantile(d, tail)), float(np.quantile(d, 1 - tail))) if d.size else (-np.inf, np.inf)
    return Change(baseline=base, current=cur, change=change_of(base, cur, relative), low=low, high=high,
                  samples=min(len(a), len(b)), paired=paired)
