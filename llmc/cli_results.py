"""The verbs over bench result files: `llmc gate` and `llmc bench report` (registered on llmc.cli's app)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Column, Table

from llmc.cli import _check_result_file, _print_json, app, bench_app, err, out
from llmc.errors import ConfigError

VERDICT_STYLE = {"regressed": "bold red", "improved": "green", "unchanged": "", "inconclusive": "yellow",
                 "missing": "yellow", "not gated": "dim"}


def _number(x, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "fraction":
        return f"{100 * x:.2f}%"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _tolerance(v) -> str:
    if v.tolerance is None:
        return "-"
    return f"{100 * v.tolerance:g}%" if v.relative else f"{v.tolerance:g}"


def _change(x, relative: bool, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:+.{digits}f}%" if relative else f"{x:+.{digits + 1}g}"


def _interval(v) -> str:
    if v.low is None:
        return "-"
    return f"{_change(v.low, v.relative, 1).rstrip('%')} … {_change(v.high, v.relative, 1)}"


TABLE_WIDTH = 112        # a log (no terminal) gets the gate table whole, not wrapped at 80 columns


def _gate_table(report) -> None:
    """One row per metric, grouped by result kind; then, on stderr, why each non-passing verdict."""
    from rich import box

    t = Table(Column("metric", no_wrap=True), *(Column(h, justify="right", no_wrap=True) for h in (
                  "baseline", "current", "change", f"{100 * report.config.confidence:.0f}% CI", "tol.", "n")),
              Column("verdict", no_wrap=True),
              box=box.SIMPLE_HEAD, title=f"llmc gate · {escape(', '.join(report.results))} against "
                                          f"{escape(report.baseline)}",
              caption=f"bootstrap over {report.config.resamples:,} resamples; n: samples behind the smaller run "
                      f"(p: paired, the same windows in both)")
    kinds = list(dict.fromkeys(v.kind for v in report.verdicts))
    for kind in kinds:
        if len(kinds) > 1:
            t.add_row(f"[bold]{kind}[/]")
        for v in (v for v in report.verdicts if v.kind == kind):
            n = "-" if v.samples is None else f"{v.samples}{'p' if v.paired else ''}"
            ci = _interval(v)
            style = VERDICT_STYLE[v.verdict]
            t.add_row(escape(v.metric), _number(v.baseline, v.unit), _number(v.current, v.unit),
                      _change(v.change, v.relative), ci, _tolerance(v), n,
                      f"[{style}]{v.verdict}[/]" if style else v.verdict)
    if out.is_terminal:
        out.print(t)
    else:
        from rich.console import Console
        Console(width=max(out.width, TABLE_WIDTH)).print(t)
    for v in report.verdicts:
        if v.verdict in ("regressed", "inconclusive", "missing"):
            err.print(f"{v.verdict}: {v.kind} · {v.metric}: {v.reason}", markup=False, highlight=False,
                      soft_wrap=True)


@app.command("gate")
def gate_cmd(
    results: list[Path] = typer.Argument(..., metavar="RESULTS", help="Result files of llmc bench --json (or "
                                         "baselines): matched to the baseline's results by kind, in order."),
    baseline: Path = typer.Option(..., "--baseline", help="The baseline: a result file, or several bundled by "
                                  "--update-baseline."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A bundled recipe (int4-gptq, int8, ...) or a "
                                          ".toml file whose [gate] table sets the tolerances; default: every metric "
                                          "with a direction within 5%, relative."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML: one test case per metric, "
                                         "a regression as a failure."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the verdicts as JSON to this file "
                                            "('-': to stdout, instead of the table)."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Write RESULTS as the new baseline "
                                         "(atomically) after showing how they compare with the old one; exit 0."),
) -> None:
    """Compare bench results with a baseline: a bootstrap verdict per metric (regressed, improved,
    unchanged, inconclusive). Exit 0: no regression; 1: a regression; 2: files that don't match."""
    from llmc.gate import gate, update_baseline as write_baseline
    from llmc.io import check_output, stamp_json, write_json_atomic

    inputs = [*results, baseline]
    _check_result_file(json_path, inputs)
    if junit is not None:
        check_output(junit, inputs, force=True, directory=False, what="JUnit file")
    if update_baseline:
        check_output(baseline, results, force=True, directory=False, what="baseline")
        if baseline.exists():
            try:
                _gate_table(gate(results, baseline, profile))
            except ConfigError as e:
                err.print(f"note: not compared with the old baseline: {e.one_line()}", markup=False, highlight=False)
        n = write_baseline(results, baseline)
        err.print(f"wrote the baseline {baseline} ({n} result{'s' if n != 1 else ''})", markup=False, highlight=False)
        return
    report = gate(results, baseline, profile)
    if junit is not None:
        from llmc.junit import write_junit
        write_junit(report, junit)
    if json_path == "-":
        _print_json(stamp_json(report.to_json()))
    else:
        if json_path is not None:
            write_json_atomic(Path(json_path), stamp_json(report.to_json()))
        _gate_table(report)
    counts = ", ".join(f"{n} {k}" for k, n in report.counts().items() if n)
    verdict = "FAILED" if report.regressed else "passed"
    err.print(f"gate {verdict}: {counts}", markup=False, highlight=False)
    raise typer.Exit(report.exit_code)


@bench_app.command("report")
def bench_report_cmd(
    results: list[Path] = typer.Argument(..., metavar="RESULTS", help="Result files of llmc bench --json "
                                         "(quality, throughput, serve; a baseline bundle too)."),
    output: Path = typer.Option(..., "-o", "--output", help="The report directory to write (atomically): "
                                "index.html (self-contained), report.md and the plots as PNG."),
    title: Optional[str] = typer.Option(None, "--title", help="The page's title."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if llmc wrote it."),
) -> None:
    """Speed and quality side by side: one HTML page (and a Markdown twin) with the models and recipes,
    quality (perplexity, KL, top-1), speed (prefill, decode, serving latency percentiles) and plots:
    quality against size on disk with the Pareto front, decode tok/s against batch size, TTFT / ITL."""
    from llmc.bench.report import report

    r = report(results, output, title=title, force=force)
    kinds = ", ".join(f"{n} {k}" for k, n in r.counts.items() if n)
    out.print(f"wrote {r.html} and {r.markdown.name} ({kinds} result{'s' if sum(r.counts.values()) != 1 else ''}; "
              f"{len(r.plots)} plot{'s' if len(r.plots) != 1 else ''})", markup=False, highlight=False)
