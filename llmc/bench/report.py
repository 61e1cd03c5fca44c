"""`llmc bench report`: bench result files (llmc.bench.result) as one self-contained HTML page and
its Markdown twin.

The output directory holds `index.html` (no external CSS, JS or fonts; the plots are embedded as
`data:` URIs, so the file works when copied alone), `report.md` (the same tables; the plots as
`plot-NAME.png` beside it) and the PNG files. It is written atomically (llmc.io.atomic_directory):
a failure anywhere leaves no half-written directory and an earlier report as it was.

Sections, each only for the kinds of result given: models (path, kind, recipe, size on disk,
sha256), quality (with the plot of KL divergence and perplexity against size, and their Pareto
front), throughput (per model and batch size; decode tok/s against batch size), serving (latency
percentiles, throughput, goodput; the ECDFs of TTFT and ITL) and environment. Every table is built
once (`Table`) and rendered twice, so the page and the Markdown never disagree; every string from a
file is escaped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.bench.report_render import Section, Table, html_page, markdown
from llmc.bench.result import KINDS, load_results
from llmc.bench.serve import LATENCY_STATS as PERCENTILES
from llmc.errors import ConfigError
from llmc.io import atomic_directory, check_output, producer_stamp, write_bytes_atomic, write_text_atomic

TITLE = "llmc bench report"
NONE = "—"
MATPLOTLIB = "llmc bench report needs matplotlib: pip install 'llmc[report]'"
LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "e2e"))
_AT_BATCH = re.compile(r"^(?P<name>\w+)@batch(?P<batch>\d+)$")


@dataclass(frozen=True)
class ReportResult:
    out_dir: Path
    html: Path
    markdown: Path
    plots: tuple[str, ...]             # file names in out_dir, e.g. "plot-quality.png"
    counts: dict[str, int]             # results per kind


@dataclass(frozen=True)
class Loaded:
    source: Path                       # the file it came from
    result: dict[str, Any]
    label: str                         # the model's short name, unique per model in the report
    color: str


# ---------------------------------------------------------------------------------------------
# Formatting

def format_bytes(n: int | float | None) -> str:
    if n is None:
        return NONE
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt(x: float | int | None, spec: str, suffix: str = "") -> str:
    return NONE if x is None else f"{format(x, spec)}{suffix}"


def recipe_summary(recipe: dict[str, Any] | None) -> str:
    """{"scheme": {"name": "w4a16", "weight": {"group_size": 32}}, "algorithm": "gptq"} -> "w4a16 gptq g32"."""
    if not recipe:
        return "float"
    if not isinstance(recipe, dict):
        return str(recipe)
    scheme = recipe.get("scheme") if isinstance(recipe.get("scheme"), dict) else {}
    weight = scheme.get("weight") if isinstance(scheme.get("weight"), dict) else {}
    parts = [str(scheme.get("name") or weight.get("dtype") or "?"), str(recipe.get("algorithm") or "")]
    if weight.get("group_size"):
        parts.append(f"g{weight['group_size']}")
    if recipe.get("weight_observer") not in (None, "mse"):            # mse: the default
        parts.append(f"{recipe['weight_observer']} observer")
    for key, name in (("kv_cache", "kv"), ("embeddings", "emb"), ("head", "head")):
        v = recipe.get(key)
        if v:
            parts.append(f"{name} {v.get('dtype', '?') if isinstance(v, dict) else v}")
    return " ".join(p for p in parts if p)


def value(r: dict[str, Any], name: str) -> float | int | None:
    m = r["metrics"].get(name)
    return None if m is None else m["value"]


# ---------------------------------------------------------------------------------------------
# Reading

def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_numbers(r: dict[str, Any], source: Path) -> None:
    """Every value the report reads is a number (or None), so a bad file is a one-line error."""
    for name, m in r["metrics"].items():
        if m["value"] is not None and not _number(m["value"]):
            raise ConfigError(f"{source}: metric {name!r} has a value that is not a number: {m['value']!r}")
    size = r["model"].get("bytes_on_disk")
    if size is not None and not _number(size):
        raise ConfigError(f"{source}: model.bytes_on_disk is not a number: {size!r}")
    if r["kind"] == "serve":
        for i, rec in enumerate(r["samples"].get("requests") or []):
            if not isinstance(rec, dict):
                raise ConfigError(f"{source}: request record {i} is not an object")
            gaps = rec.get("itl_ms") or []
            if not (rec.get("ttft_ms") is None or _number(rec["ttft_ms"])) or \
                    not (isinstance(gaps, list) and all(map(_number, gaps))):
                raise ConfigError(f"{source}: request record {i} has a ttft_ms or itl_ms that is not a number")


def _model_key(model: dict[str, Any]) -> tuple[str, str | None]:
    return str(model.get("path") or model.get("name") or "?"), model.get("sha256")


def _load(paths: list[Path]) -> list[Loaded]:
    from llmc.bench.report_plots import color
    if not paths:
        raise ConfigError("no result files given", hint="pass files written by `llmc bench ... --json FILE`")
    seen, pairs = set(), []
    for p in paths:
        if p.resolve() in seen:
            raise ConfigError(f"{p}: given twice")
        seen.add(p.resolve())
        for r in load_results(p):
            _check_numbers(r, p)
            pairs.append((p, r))
    keys = list(dict.fromkeys(_model_key(r["model"]) for _, r in pairs))
    names = [Path(k[0]).name or k[0] for k in keys]
    labels = {k: n if names.count(n) == 1 else f"{n} ({(k[1] or '?')[:8]})" for k, n in zip(keys, names)}
    labels = {k: lab if list(labels.values()).count(lab) == 1 else f"{lab} #{i + 1}"
              for i, (k, lab) in enumerate(labels.items())}
    return [Loaded(p, r, labels[_model_key(r["model"])], color(keys.index(_model_key(r["model"]))))
            for p, r in pairs]


# ---------------------------------------------------------------------------------------------
# Tables

def _size(x: Loaded) -> int | float | None:
    return x.result["model"].get("bytes_on_disk", value(x.result, "bytes_on_disk"))


def _model_kind(model: dict[str, Any]) -> str:
    return {"engine.json": "engine", "config.json": "checkpoint"}.get(model.get("sha256_of"),
                                                                      str(model.get("kind") or NONE))


def models_table(loaded: list[Loaded]) -> Table:
    rows: dict[str, list[str]] = {}
    for x in loaded:
        m = x.result["model"]
        row = rows.setdefault(x.label, [x.label, str(m.get("path") or m.get("name") or NONE), _model_kind(m),
                                        recipe_summary(m.get("recipe")), (m.get("sha256") or NONE)[:12], "",
                                        format_bytes(_size(x))])
        row[5] = ", ".join(dict.fromkeys([*filter(None, row[5].split(", ")), x.result["kind"]]))
        if row[6] == NONE:
            row[6] = format_bytes(_size(x))
    return Table(("model", "path", "kind", "recipe", "sha256", "results", "size on disk"),
                 tuple(tuple(r) for r in rows.values()), left=6, wrap=(0, 1))


def _captions(items: list[str]) -> str | None:
    items = list(dict.fromkeys(i for i in items if i))
    return "; ".join(items) or None


def quality_table(loaded: list[Loaded]) -> Table:
    rows = []
    for x in loaded:
        r = x.result
        ppl, ref = value(r, "perplexity"), value(r, "reference_perplexity")
        delta = (ppl / ref - 1) * 100 if ppl is not None and ref else None
        rows.append((x.label, recipe_summary(r["model"].get("recipe")), fmt(ppl, ".4f"), fmt(ref, ".4f"),
                     fmt(delta, "+.2f", "%"), fmt(value(r, "kl_divergence"), ".5f"),
                     fmt(None if value(r, "top1_agreement") is None else 100 * value(r, "top1_agreement"), ".2f", "%"),
                     fmt(value(r, "tokens"), ",d" if isinstance(value(r, "tokens"), int) else ",.0f"),
                     format_bytes(_size(x))))
    caption = _captions([f"{x.result['config'].get('text', '?')}, windows of {x.result['config'].get('seqlen', '?')} "
                         f"tokens, against {x.result['config'].get('reference', '?')}" for x in loaded])
    return Table(("model", "recipe", "perplexity", "reference ppl", "Δ ppl", "KL (nats/token)", "top-1 agree",
                  "tokens", "size on disk"), tuple(rows), left=2, caption=caption)


def batches(r: dict[str, Any]) -> list[int]:
    return sorted({int(m["batch"]) for m in map(_AT_BATCH.match, r["metrics"]) if m})


def throughput_table(loaded: list[Loaded]) -> Table:
    ratios = any(name.startswith("decode_tok_s_ratio@") for x in loaded for name in x.result["metrics"])
    rows = []
    for x in loaded:
        r = x.result
        for b in batches(r):
            row = (x.label, recipe_summary(r["model"].get("recipe")), str(b),
                   fmt(value(r, f"prefill_tok_s@batch{b}"), ",.1f"), fmt(value(r, f"decode_tok_s@batch{b}"), ",.1f"),
                   fmt(value(r, f"e2e_tok_s@batch{b}"), ",.1f"), fmt(value(r, f"ttft_ms@batch{b}"), ".2f"))
            rows.append(row + ((fmt(value(r, f"decode_tok_s_ratio@batch{b}"), ".3f", "x"),) if ratios else ()))
    caption = _captions([f"input {c.get('input_len', '?')}, output {c.get('output_len', '?')} tokens, medians of "
                         f"{c.get('repeat', '?')} runs" + (f", against {c['against']}" if c.get("against") else "")
                         for c in (x.result["config"] for x in loaded)])
    return Table(("model", "recipe", "batch", "prefill tok/s", "decode tok/s", "e2e tok/s", "TTFT ms")
                 + (("decode vs against",) if ratios else ()), tuple(rows), left=2, caption=caption)


def _load_text(config: dict[str, Any]) -> str:
    rate, conc = config.get("request_rate"), config.get("concurrency")
    parts = ([f"rate {rate:g} req/s" if _number(rate) else f"rate {rate}"] if rate is not None else []) + \
        ([f"concurrency {conc}"] if conc is not None else [])
    return ", ".join(parts) or NONE


def _slo_text(config: dict[str, Any]) -> str:
    slo = config.get("slo") if isinstance(config.get("slo"), dict) else {}
    return ", ".join(f"{k.removesuffix('_ms').upper()} ≤ {v:g} ms" for k, v in slo.items() if _number(v)) or NONE


def serve_tables(loaded: list[Loaded]) -> tuple[Table, Table]:
    summary, latency = [], []
    for x in loaded:
        r, c = x.result, x.result["config"]
        n = c.get("num_requests")
        summary.append((x.label, _load_text(c), _slo_text(c), str(n) if isinstance(n, int) else NONE,
                        fmt(value(r, "completed"), ",.0f"), fmt(value(r, "failed"), ",.0f"),
                        fmt(value(r, "request_throughput"), ".2f"), fmt(value(r, "output_throughput"), ",.1f"),
                        fmt(value(r, "goodput"), ".2f")))
        for key, name in LATENCIES:
            latency.append((x.label, name, *(fmt(value(r, f"{key}_{p}"), ".2f") for p in PERCENTILES)))
    caption = _captions([f"input {c.get('input_len', '?')}, output {c.get('output_len', '?')} tokens per request"
                         for c in (x.result["config"] for x in loaded)])
    return (Table(("model", "load", "SLO", "requests", "completed", "failed", "req/s", "output tok/s",
                   "goodput req/s"), tuple(summary), left=3, caption=caption),
            Table(("model", "latency (ms)", *PERCENTILES), tuple(latency), left=2))


def environment_table(loaded: list[Loaded]) -> Table:
    rows = []
    for x in loaded:
        env = x.result.get("env") if isinstance(x.result.get("env"), dict) else {}
        rows.append((x.source.name, x.result["kind"], x.label, *(str(env.get(k) if env.get(k) is not None else NONE)
                                                                 for k in ("cpu", "cpu_count", "threads", "llmc",
                                                                           "torch", "python"))))
    return Table(("file", "kind", "model", "cpu", "cores", "threads", "llmc", "torch", "python"), tuple(rows),
                 left=9, wrap=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# Plots

def _plots(by_kind: dict[str, list[Loaded]]) -> dict[str, bytes]:
    """name -> PNG bytes, for the plots there are results for."""
    from llmc.bench import report_plots as rp
    out = {}
    points = [rp.QualityPoint(x.label, x.color, _size(x) / (1 << 20), value(x.result, "kl_divergence"),
                              value(x.result, "perplexity")) for x in by_kind["quality"] if _size(x) is not None]
    if any(p.kl is not None or p.perplexity is not None for p in points):
        out["quality"] = rp.quality_vs_size(points)
    series = []
    for x in by_kind["throughput"]:
        pts = [(b, value(x.result, f"decode_tok_s@batch{b}")) for b in batches(x.result)]
        pts = [(b, v) for b, v in pts if v is not None]
        if pts:
            series.append(rp.Series(x.label, x.color, tuple(b for b, _ in pts), tuple(v for _, v in pts)))
    if series:
        out["decode"] = rp.decode_vs_batch(series)
    lats = []
    for x in by_kind["serve"]:
        ok = [rec for rec in x.result["samples"].get("requests") or [] if rec.get("ok", True)]
        lats.append(rp.Latencies(x.label, x.color, tuple(r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None),
                                 tuple(g for r in ok for g in r.get("itl_ms") or [])))
    if any(lat.ttft_ms or lat.itl_ms for lat in lats):
        out["serve"] = rp.serve_latency(lats)
    return out


# ---------------------------------------------------------------------------------------------
# The report

def sections(by_kind: dict[str, list[Loaded]], loaded: list[Loaded]) -> list[Section]:
    out = [Section("models", "Models", (models_table(loaded),))]
    if by_kind["quality"]:
        out.append(Section("quality", "Quality", (quality_table(by_kind["quality"]),), "quality",
                           "KL divergence and perplexity against size on disk, with the Pareto front"))
    if by_kind["throughput"]:
        out.append(Section("throughput", "Throughput", (throughput_table(by_kind["throughput"]),), "decode",
                           "decode tokens/s against batch size"))
    if by_kind["serve"]:
        out.append(Section("serve", "Serving", serve_tables(by_kind["serve"]), "serve",
                           "ECDFs of time to first token and inter-token latency"))
    out.append(Section("environment", "Environment", (environment_table(loaded),)))
    return out


def report(results: list[Path | str], out_dir: Path | str, title: str | None = None,
           force: bool = False) -> ReportResult:
    """Write the report of the result files `results` into `out_dir` (module docstring). An
    existing `out_dir` is replaced only with `force`, and only if llmc wrote it."""
    try:
        import matplotlib  # noqa: F401  (the plots need it; say so before any work)
    except ImportError:
        raise ConfigError(MATPLOTLIB) from None
    paths, out = [Path(p) for p in results], Path(out_dir)
    check_output(out, paths, force=force, what="report directory")
    loaded = _load(paths)
    by_kind = {k: [x for x in loaded if x.result["kind"] == k] for k in KINDS}
    title = title or TITLE
    secs = sections(by_kind, loaded)
    with atomic_directory(out, overwrite=force, inputs=paths) as tmp:
        plots = _plots(by_kind)
        secs = [s if s.plot in plots else Section(s.id, s.title, s.tables) for s in secs]
        for name, png in plots.items():
            write_bytes_atomic(tmp / f"plot-{name}.png", png)
        sources = [str(p) for p in paths]
        write_text_atomic(tmp / "index.html", html_page(title, secs, plots, sources, producer_stamp()))
        write_text_atomic(tmp / "report.md", markdown(title, secs, sources, producer_stamp()))
    return ReportResult(out_dir=out, html=out / "index.html", markdown=out / "report.md",
                        plots=tuple(f"plot-{name}.png" for name in plots),
                        counts={k: len(v) for k, v in by_kind.items()})

