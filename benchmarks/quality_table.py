"""Quality of every scheme x algorithm on the golden models: the README's quantization table.

For each golden model and each recipe, quantize (into a temporary directory), then measure with
`llmc bench quality` against the fp32 model on that model's evaluation text: perplexity, mean KL
divergence per token, top-1 agreement, size on disk and KV-cache bytes per token.

    .venv/bin/python benchmarks/quality_table.py [--json out.json] [--markdown table.md] [--max-tokens N]
                                                 [--text MODEL=FILE ...] [--results DIR] [--report DIR]

--results DIR keeps each row's `llmc bench quality` result (schema llmc.bench.result/1, every
window) as DIR/MODEL--RECIPE.json; --report DIR then makes `llmc bench report` of them (quality
against size on disk, with the Pareto front of the recipes).

Models whose directory is missing are skipped with a note. Progress goes to stderr; the Markdown
table to stdout (and --markdown FILE). --json and --markdown are rewritten (atomically) after every
row, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmc.bench.quality import quality  # noqa: E402
from llmc.inspection import inspect  # noqa: E402
from llmc.bench.environment import environment  # noqa: E402
from llmc.bench.report import report  # noqa: E402
from llmc.io import write_json_atomic, write_result_json, write_text_atomic  # noqa: E402
from llmc.quantizer import quantize_checkpoint  # noqa: E402
from llmc.quantized.formats import TensorQuant  # noqa: E402
from llmc.quantized.scheme import EMBEDDING_FORMATS, HEAD_FORMATS, QuantRecipe, resolve_scheme  # noqa: E402

MODELS = {  # name: (directory, evaluation text, group size that is meaningful for its widths, seqlen)
    "stories260K": (ROOT / "golden/stories260K", ROOT / "golden/tinystories_valid_head.txt", 32, 512),
    "stdlib-llama": (ROOT / "golden/stdlib-llama", ROOT / "golden/stdlib-llama/validation.txt", 128, 256),
}


def recipes(group: int, samples: int, seqlen: int) -> dict[str, QuantRecipe | None]:
    def r(scheme, algo="rtn", kv=None, weight_observer=None, head=None, embeddings=None, imatrix=False,
          target_bpw=None, **kw):
        return QuantRecipe(scheme=resolve_scheme(scheme, **kw), algorithm=algo, calib_samples=samples,
                           calib_seqlen=seqlen, kv_cache=TensorQuant(dtype=kv) if kv else None,
                           weight_observer=weight_observer, head=HEAD_FORMATS[head] if head else None,
                           embeddings=EMBEDDING_FORMATS[embeddings] if embeddings else None, imatrix=imatrix,
                           target_bpw=target_bpw)
    return {
        "fp32": None,
        "w8a16 rtn": r("w8a16"),
        "w8a16 gptq": r("w8a16", "gptq"),
        f"w4a16 rtn g{group}": r("w4a16", group_size=group),
        f"w4a16 gptq g{group}": r("w4a16", "gptq", group_size=group),
        f"w4a16 awq g{group}": r("w4a16", "awq", group_size=group),
        f"w4a16 gptq g{group}, symmetric, minmax": r("w4a16", "gptq", group_size=group, symmetric=True,
                                                      weight_observer="minmax"),          # the old defaults
        f"w4a16 rtn g{group}, imatrix": r("w4a16", group_size=group, imatrix=True),
        f"w4a16 gptq g{group}, two-level scales": r("w4a16", "gptq", group_size=group, two_level=True),
        "w4a16 gptq --target-bpw 5.25 (int4-auto)": r("w4a16", "gptq", target_bpw=5.25),
        "w4a16 gptq --target-bpw 6": r("w4a16", "gptq", target_bpw=6.0),
        f"w4a8 rtn g{group}": r("w4a8", group_size=group),
        f"w4a8 gptq g{group}": r("w4a8", "gptq", group_size=group),
        f"w4a8 awq g{group}": r("w4a8", "awq", group_size=group),
        "w8a8 rtn": r("w8a8"),
        "w8a8 smoothquant": r("w8a8", "smoothquant"),
        "fp8 rtn": r("fp8"),
        "w8a16 rtn + head int8": r("w8a16", head="int8"),
        f"w4a16 gptq g{group} + head int8": r("w4a16", "gptq", group_size=group, head="int8"),
        f"w4a16 gptq g{group} + head int4": r("w4a16", "gptq", group_size=group, head="int4"),
        "w8a16 rtn + embeddings int8": r("w8a16", embeddings="int8"),
        f"w4a16 gptq g{group} + head int8 + embeddings int8": r("w4a16", "gptq", group_size=group, head="int8",
                                                                embeddings="int8"),
        "w8a16 rtn + kv int8": r("w8a16", kv="int8"),
        "w8a16 rtn + kv fp8": r("w8a16", kv="fp8_e4m3"),
    }


@dataclass(frozen=True)
class Row:
    model: str
    recipe: str
    perplexity: float
    reference_perplexity: float
    kl_divergence: float
    top1_agreement: float
    tokens: int
    bytes_on_disk: int
    kv_bytes_per_token: int
    seconds: float


def measure(name: str, path: Path, text: Path, group: int, seqlen: int, max_tokens: int, samples: int,
            work: Path, calib: Path | None, on_row: Callable[[Row, dict], None]) -> None:
    """Every recipe's row, given to on_row as it is measured. A model that ships its own calibration
    text (in its domain) calibrates on it."""
    for label, recipe in recipes(group, samples, seqlen).items():
        t0 = time.perf_counter()
        print(f"[quality_table] {name}: {label}", file=sys.stderr, flush=True)
        target = path
        if recipe is not None:
            target = work / f"{name}-{label.replace(' ', '_').replace('+', '')}"
            quantize_checkpoint(path, target, recipe, force=True, calib=calib)
        q = quality(target, path, text, seqlen=seqlen, max_tokens=max_tokens)
        info = inspect(target)
        weights = sum(f.stat().st_size for f in Path(target).iterdir() if f.suffix == ".safetensors")
        on_row(Row(name, label, q.perplexity, q.reference_perplexity, q.kl_divergence, q.top1_agreement,
                   q.tokens, weights, info.kv_cache_bytes_per_token, time.perf_counter() - t0),
               q.to_result(environment()).to_json())


def markdown(rows: list[Row]) -> str:
    lines = ["| model | recipe | perplexity | Δ vs fp32 | KL (nats/token) | top-1 agree | weights on disk | KV bytes/token |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        delta = 100 * (r.perplexity / r.reference_perplexity - 1)
        lines.append(f"| {r.model} | {r.recipe} | {r.perplexity:.4f} | {delta:+.2f}% | {r.kl_divergence:.5f} | "
                     f"{100 * r.top1_agreement:.2f}% | {r.bytes_on_disk / 1024:,.0f} KiB | {r.kv_bytes_per_token:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=16352, help="Scored tokens of each evaluation text.")
    ap.add_argument("--calib-samples", type=int, default=64, help="Calibration samples (default text).")
    ap.add_argument("--models", nargs="*", default=list(MODELS), help="Which golden models.")
    ap.add_argument("--text", action="append", default=[], metavar="MODEL=FILE",
                    help="Evaluate MODEL on FILE instead of its own evaluation text (repeatable).")
    ap.add_argument("--json", type=Path, help="Write every row as JSON here.")
    ap.add_argument("--markdown", type=Path, help="Write the Markdown table here.")
    ap.add_argument("--results", type=Path, help="Keep each row's bench quality result (JSON) in this directory.")
    ap.add_argument("--report", type=Path, help="Then write `llmc bench report` of those results here "
                    "(needs --results).")
    args = ap.parse_args()
    texts = {}
    for item in args.text:
        model, sep, file = item.partition("=")
        if not sep or model not in MODELS or not Path(file).is_file():
            ap.error(f"--text {item!r}: expected MODEL=FILE with MODEL in {', '.join(MODELS)} and an existing FILE")
        texts[model] = Path(file)
    if args.report and not args.results:
        ap.error("--report needs --results DIR")
    rows: list[Row] = []
    kept: list[Path] = []

    def add(row: Row, result: dict) -> None:     # every row saved as soon as it is measured
        rows.append(row)
        if args.results:
            kept.append(args.results / f"{row.model}--{row.recipe.replace(' ', '_').replace(',', '')}.json")
            write_result_json(kept[-1], result)
        if args.markdown:
            write_text_atomic(args.markdown, markdown(rows))
        if args.json:
            write_json_atomic(args.json, {"rows": [asdict(r) for r in rows], "max_tokens": args.max_tokens})
    with tempfile.TemporaryDirectory(prefix="llmc-quality-") as tmp:
        for name in args.models:
            path, text, group, seqlen = MODELS[name]
            text = texts.get(name, text)
            if not path.exists():
                print(f"[quality_table] {name}: {path} is missing, skipped", file=sys.stderr)
                continue
            calib = path / "calibration.txt"
            measure(name, path, text, group, seqlen, args.max_tokens, args.calib_samples, Path(tmp),
                    calib if calib.exists() else None, add)
    sys.stdout.write(markdown(rows))
    if args.report and kept:
        r = report(kept, args.report, title="llmc quality table", force=True)
        print(f"[quality_table] report: {r.html}", file=sys.stderr)


if __name__ == "__main__":
    main()
