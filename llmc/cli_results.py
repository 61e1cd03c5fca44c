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
    return f"{100 * v.tolerance:.1f}%" if v.relative else f"{v.tolerance:g}"


def _gate_table(report) -> None:
    from llmc.gate import describe

    t = Table(Column("metric"), *(Column(h, justify="right") for h in ("baseline", "current", "change (CI)",
                                                                       "tolerance", "n")), Column("verdict"),
              title=f"llmc gate · {escape(', '.join(report.results))} against {escape(report.baseline)}",
              caption=f"{100 * report.config.confidence:.0f}% bootstrap intervals, {report.config.resamples:,} "
                      f"resamples; n: samples behind the smaller run (p: paired)")
    for v in report.verdicts:
        n = "-" if v.samples is None else f"{v.samples}{'p' if v.paired else ''}"
        style = VERDICT_STYLE[v.verdict]
        t.add_row(escape(f"{v.kind} · {v.metric}"), _number(v.baseline, v.unit), _number(v.current, v.unit),
                  describe(v), _tolerance(v), n, f"[{style}]{v.verdict}[/]" if style else v.verdict)
    out.print(t)
    for v in report.verdicts:
        if v.verdict in ("regressed", "inconclusive", "missing"):
            err.print(f"{v.verdict}: {v.kind} · {v.metric}: {v.reason}", markup=False, highlight=False,
                      soft_wrap=True)


@app.command("gate")
def gate_cmd(
    results: list[Path] = typer.Argument(..., metavar="RESULTS...", help="Result files of llmc bench --json (or "
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
