"""The plots of `llmc bench report` (llmc.bench.report): PNG bytes from plain data, drawn with
matplotlib's Agg canvas on a `Figure` of its own (no pyplot, no display, no global state). A `$` in
a label from a file is escaped, so a model path is drawn as written, not parsed as mathtext.

- quality against size on disk, with the Pareto front (`pareto_front`) as a step line;
- decode tok/s against batch size, one line per throughput result, on a log2 axis;
- the ECDFs of serving TTFT and inter-token latency, one line per serve result.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

DPI = 100
LABEL_ALL = 8                      # more quality points than this: only those on the front are labelled
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


@dataclass(frozen=True)
class QualityPoint:
    label: str
    color: str
    mib: float                     # size on disk
    kl: float | None               # nats/token
    perplexity: float | None


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    batches: tuple[int, ...]
    decode_tok_s: tuple[float, ...]


@dataclass(frozen=True)
class Latencies:
    label: str
    color: str
    ttft_ms: tuple[float, ...]     # one per successful request
    itl_ms: tuple[float, ...]      # every gap of every successful request


def _text(label: str) -> str:
    """A label drawn as written: `$` would start mathtext, and a legend hides labels starting with `_`."""
    label = label.replace("$", r"\$")
    return " " + label if label.startswith("_") else label


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indexes of the points no other point dominates (both smaller-or-equal, one strictly), in
    order of x: the smallest size for each level of loss."""
    def dominated(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points)
    return sorted((i for i, p in enumerate(points) if not dominated(p)), key=lambda i: points[i])


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white",
                metadata={"Software": None})                  # the same data makes the same bytes
    return buf.getvalue()


def _spread_scale(ax, values: Sequence[float], axis: str = "x") -> None:
    """A log axis when the values span more than 20x, else linear."""
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > 20:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _quality_panel(ax, points: list[QualityPoint], field: str, ylabel: str) -> None:
    pts = [p for p in points if getattr(p, field) is not None]
    xy = [(p.mib, getattr(p, field)) for p in pts]
    front = pareto_front(xy)
    if len(front) > 1:
        ax.step([xy[i][0] for i in front], [xy[i][1] for i in front], where="post", color="#444444",
                linewidth=1.2, linestyle="--", zorder=1, label="Pareto front")
    crowded = len(pts) > LABEL_ALL
    for i, (p, (x, y)) in enumerate(zip(pts, xy)):
        on = i in front
        ax.scatter([x], [y], s=70 if on else 40, color=p.color, edgecolors="black" if on else "none",
                   linewidths=1.2, marker="D" if on else "o", zorder=3)
        if on or not crowded:                     # many recipes: only the front is named (the table has all)
            ax.annotate(_text(p.label), (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8)
    ax.scatter([], [], marker="D", color="white", edgecolors="black", label="on the front")
    _spread_scale(ax, [x for x, _ in xy])
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.margins(0.15)


def quality_vs_size(points: Sequence[QualityPoint]) -> bytes:
    """KL divergence and perplexity against size on disk (lower-left is better)."""
    points = list(points)
    panels = [(f, lab) for f, lab in (("kl", "KL divergence (nats/token)"), ("perplexity", "perplexity"))
              if any(getattr(p, f) is not None for p in points)]
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    for ax, (field, ylabel) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _quality_panel(ax, points, field, ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]} against size")
    return _png(fig)


def decode_vs_batch(series: Sequence[Series]) -> bytes:
    """Decode tokens/s against batch size, one line per throughput result."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for s in series:
        ax.plot(s.batches, s.decode_tok_s, marker="o", color=s.color, label=_text(s.label))
    batches = sorted({b for s in series for b in s.batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())
    if len(batches) == 1:
        ax.set_xlim(batches[0] / 2, batches[0] * 2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode throughput against batch size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _ecdf(ax, values: Sequence[float], color: str, label: str) -> None:
    xs = sorted(values)
    n = len(xs)
    ax.step(xs, [(i + 1) / n for i in range(n)], where="post", color=color, label=f"{_text(label)} (n={n})")


def serve_latency(latencies: Sequence[Latencies]) -> bytes:
    """The ECDFs of TTFT (one value per request) and ITL (every gap), one line per serve result."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, field, title, xlabel, ylabel in (
            (axes[0], "ttft_ms", "time to first token", "TTFT (ms)", "fraction of requests"),
            (axes[1], "itl_ms", "inter-token latency", "ITL (ms)", "fraction of gaps")):
        drawn = [lat for lat in latencies if getattr(lat, field)]
        for lat in drawn:
            _ecdf(ax, getattr(lat, field), lat.color, lat.label)
        _spread_scale(ax, [v for lat in drawn for v in getattr(lat, field)])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{title} (ECDF)")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)
