"""JUnit XML of a gate: the format CI systems read (Jenkins, GitLab, GitHub Actions' test reporters).

    <testsuites name="llmc gate" tests= failures= errors="0" skipped= time="0">
      <testsuite name="quality · results/int4.json" tests= failures= errors="0" skipped= time="0">
        <testcase classname="llmc.gate.quality" name="perplexity" time="0">
          <failure type="regression" message="perplexity regressed: +12.31% (CI +10.02% … +14.77%) ...">...</failure>
        </testcase>

One test case per metric: a regression is a <failure> whose message names the metric, the change
and its interval; an inconclusive verdict is <skipped> with why; the rest pass, with the verdict in
<system-out>.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from llmc.gate import GateReport, Verdict, describe
from llmc.io import xml_stamp


def _detail(v: Verdict) -> str:
    tol = "-" if v.tolerance is None else (f"{100 * v.tolerance:.2f}%" if v.relative else f"{v.tolerance:g}")
    return (f"{v.metric}: {v.verdict}\nbaseline {v.baseline!r}, current {v.current!r} {v.unit}\n"
            f"change {describe(v)}, tolerance {tol} ({'relative' if v.relative else 'absolute'}), "
            f"{'paired, ' if v.paired else ''}{v.samples if v.samples is not None else 'one exact value'} samples\n"
            f"{v.reason}")


def message(v: Verdict) -> str:
    """One line: the metric, the verdict, the change and its interval, and why."""
    return f"{v.metric} {v.verdict}: {describe(v)}; {v.reason}"


def junit_xml(report: GateReport) -> str:
    root = ET.Element("testsuites", name="llmc gate")
    suites: dict[str, ET.Element] = {}
    for v in report.verdicts:
        suite = suites.get(v.kind)
        if suite is None:
            suite = suites[v.kind] = ET.SubElement(root, "testsuite", name=f"llmc gate · {v.kind} against "
                                                   f"{report.baseline}")
        case = ET.SubElement(suite, "testcase", classname=f"llmc.gate.{v.kind}", name=v.metric, time="0")
        if v.verdict == "regressed":
            ET.SubElement(case, "failure", type="regression", message=message(v)).text = _detail(v)
        elif v.verdict in ("inconclusive", "missing"):
            ET.SubElement(case, "skipped", message=message(v))
        ET.SubElement(case, "system-out").text = _detail(v)
    total = {"tests": 0, "failures": 0, "skipped": 0}
    for suite in suites.values():
        cases = suite.findall("testcase")
        counts = {"tests": len(cases), "failures": sum(c.find("failure") is not None for c in cases),
                  "skipped": sum(c.find("skipped") is not None for c in cases)}
        for k, n in counts.items():
            total[k] += n
        suite.attrib.update({"tests": str(counts["tests"]), "failures": str(counts["failures"]), "errors": "0",
                             "skipped": str(counts["skipped"]), "time": "0"})
    root.attrib.update({k: str(n) for k, n in total.items()})
    root.attrib.update({"errors": "0", "time": "0"})
    ET.indent(root)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{xml_stamp()}\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: GateReport, path: Path | str) -> None:
    from llmc.io import check_output, write_text_atomic

    p = Path(path)
    check_output(p, [], force=True, directory=False, what="JUnit file")
    write_text_atomic(p, junit_xml(report))
