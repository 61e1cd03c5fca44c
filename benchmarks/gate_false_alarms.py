"""How often `llmc gate` cries wolf, and how far a recipe moves when nothing real changed.

A recipe is quantized once with calibration seed 0 (the baseline) and then `--reruns` times with
seeds 1..N: the same recipe, only another draw of calibration windows, so no rerun is a real
regression. Each rerun is scored with `llmc bench quality` and gated against the baseline under a
profile's [gate] table. Reported: per metric the run-to-run spread (the largest and the typical
change of a rerun from the baseline: what a tolerance must cover), the verdict counts, and the
false-alarm rate (reruns reported regressed / reruns). A control run, a deliberately degraded
recipe (RTN in place of the recipe's algorithm, and a wrong group size), must be reported regressed.

    python benchmarks/gate_false_alarms.py --profile int4-gptq --reruns 20
    python benchmarks/gate_false_alarms.py --profile int8 --reruns 20 --json out.json

Defaults measure the recipe as llmc's own CI gates it (golden/stories260K, group size 32, 32
calibration samples of 256 tokens, windows of 128 tokens over golden/tinystories_valid_head.txt).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmc.bench.quality import quality           # noqa: E402
from llmc.bench.environment import environment    # noqa: E402
from llmc.gate import compare, config_from_profile  # noqa: E402
from llmc.io import stamp_json                     # noqa: E402
from llmc.quantizer import quantize                # noqa: E402
from llmc.quantized.scheme import recipe_from_options  # noqa: E402
from llmc.profiles import load_profile             # noqa: E402

MODEL = ROOT / "golden" / "stories260K"
TEXT = ROOT / "golden" / "tinystories_valid_head.txt"


def recipe_options(profile: str, group_size: int | None, samples: int, seqlen: int) -> dict:
    opts = load_profile(profile).section("quantize")
    opts.update(calib_samples=samples, calib_seqlen=seqlen)
    if group_size is not None and opts.get("scheme") in ("w4a16", "w4a8") and opts.get("target_bpw") is None:
        opts["group_size"] = group_size                          # a target chooses its own groups
    return opts


def measure(out: Path, opts: dict, seqlen: int) -> dict:
    o = {k: v for k, v in opts.items() if k not in ("calib", "format")}
    quantize(MODEL, out, recipe_from_options(**o))
    r = quality(out, MODEL, TEXT, seqlen=seqlen)
    return stamp_json(r.to_result(environment()).to_json())


@dataclass(frozen=True)
class Measured:
    profile: str
    options: dict
    baseline: dict                     # seed 0's quality result
    reruns: list[dict]                 # {"seed", "result", "verdicts"}
    degraded_options: dict
    degraded: dict
    control: list                      # the degraded recipe's verdicts
    seconds: float

    @property
    def false_alarms(self) -> int:
        return sum(any(v.verdict == "regressed" for v in r["verdicts"]) for r in self.reruns)

    @property
    def caught(self) -> bool:
        return any(v.verdict == "regressed" for v in self.control)


def measure_false_alarms(profile: str, reruns: int = 20, group_size: int = 32, calib_samples: int = 32,
                         calib_seqlen: int = 256, seqlen: int = 128, log=None) -> Measured:
    """The baseline (seed 0), `reruns` reruns (seeds 1..N) and the degraded control, each gated
    against the baseline under the profile's [gate] table."""
    cfg = config_from_profile(profile)
    opts = recipe_options(profile, group_size, calib_samples, calib_seqlen)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = measure(Path(tmp) / "seed0", {**opts, "calib_seed": 0}, seqlen)
        runs = []
        for seed in range(1, reruns + 1):
            r = measure(Path(tmp) / f"seed{seed}", {**opts, "calib_seed": seed}, seqlen)
            verdicts = compare(base, r, cfg, f"seed {seed}")
            runs.append({"seed": seed, "result": r, "verdicts": verdicts})
            if log is not None:
                worst = [v.metric for v in verdicts if v.verdict == "regressed"]
                log(f"seed {seed:2d}: ppl {r['metrics']['perplexity']['value']:.4f}  "
                    + "  ".join(f"{v.metric} {v.verdict}" for v in verdicts if v.verdict != "unchanged")
                    + (f"  FALSE ALARM: {worst}" if worst else ""))
        degraded_opts = {**opts, "algo": "rtn", "calib_seed": 0}
        if opts.get("target_bpw") is not None:                    # mixed precision: a smaller budget
            degraded_opts["target_bpw"] = opts["target_bpw"] - 0.4
        elif opts.get("scheme") in ("w4a16", "w4a8"):
            degraded_opts["group_size"] = 2 * group_size
        else:
            degraded_opts["scheme"] = "w4a16"                      # an 8-bit recipe degraded to 4 bits
            degraded_opts["group_size"] = 2 * group_size
        degraded_opts = {k: v for k, v in degraded_opts.items() if k not in ("alpha", "kv_cache")}
        degraded = measure(Path(tmp) / "degraded", degraded_opts, seqlen)
        control = compare(base, degraded, cfg, "degraded")
    return Measured(profile, opts, base, runs, degraded_opts, degraded, control, time.perf_counter() - t0)


def table(m: Measured) -> str:
    """The Markdown report: per metric the spread of the reruns, their verdicts, the control's."""
    lines = [f"{m.profile} on {MODEL.name}: baseline (seed 0) and {len(m.reruns)} reruns with calibration seeds "
             f"1..{len(m.reruns)}, gated with the profile's [gate] table ({m.seconds:.0f} s)", "",
             "| metric | tolerance | baseline | median rerun change | largest rerun change | verdicts | degraded recipe |",
             "|---|---|---|---|---|---|---|"]
    for name in [v.metric for v in m.reruns[0]["verdicts"]]:
        vs = [next(v for v in run["verdicts"] if v.metric == name) for run in m.reruns]
        changes = [v.change for v in vs if v.change is not None]
        ctl = next((v for v in m.control if v.metric == name), None)
        unit = (lambda x: f"{100 * x:+.2f}%") if vs[0].relative else (lambda x: f"{x:+.4f}")
        tol = "-" if vs[0].tolerance is None else (f"{100 * vs[0].tolerance:.1f}%" if vs[0].relative
                                                    else f"{vs[0].tolerance:g}")
        counts = ", ".join(f"{sum(v.verdict == k for v in vs)} {k}" for k in dict.fromkeys(v.verdict for v in vs))
        typical = unit(statistics.median(abs(c) for c in changes)) if changes else "-"
        largest = unit(max(changes, key=abs)) if changes else "-"
        control = "-" if ctl is None else f"{ctl.verdict} ({unit(ctl.change) if ctl.change is not None else '-'})"
        lines.append(f"| {name} | {tol} | {vs[0].baseline:.5g} | ±{typical.lstrip('+')} | {largest} | {counts} | "
                     f"{control} |")
    lines += ["", f"false alarms: {m.false_alarms} of {len(m.reruns)} reruns "
                  f"({100 * m.false_alarms / len(m.reruns):.0f}%); degraded recipe "
                  f"{'reported regressed' if m.caught else 'NOT caught'}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="int4-gptq")
    ap.add_argument("--reruns", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=128, help="quality windows")
    ap.add_argument("--json", type=Path, help="write every result and verdict here")
    args = ap.parse_args()
    m = measure_false_alarms(args.profile, args.reruns, args.group_size, args.calib_samples, args.calib_seqlen,
                             args.seqlen, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(m))
    if args.json:
        args.json.write_text(json.dumps({"profile": m.profile, "options": m.options, "baseline": m.baseline,
                                         "reruns": [{"seed": r["seed"], "result": r["result"],
                                                     "verdicts": [v.__dict__ for v in r["verdicts"]]}
                                                    for r in m.reruns],
                                         "degraded": {"options": m.degraded_options, "result": m.degraded,
                                                      "verdicts": [v.__dict__ for v in m.control]},
                                         "false_alarms": m.false_alarms}, indent=1))
    sys.exit(0 if m.false_alarms == 0 and m.caught else 1)


if __name__ == "__main__":
    main()
