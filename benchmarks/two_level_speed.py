"""Decode speed of int4 weights with two-level scales against float16 scales, on the native executor.

What it measures
  A random-initialised TinyLlama-shaped fp32 checkpoint cut to --layers decoder layers (hidden 2048,
  32 query / 4 KV heads, intermediate 5632, vocabulary 32000; built by benchmarks/quantize_memory.py's
  builder into --model-dir, reused when it already holds that shape) is quantized twice with
  `llmc quantize --scheme w4a16 --algo rtn --observer minmax --group-size G --head int4`: once with
  float16 scales, once with --two-level-scales (the head, int4 in groups of 32 with float16 scales,
  is the same in both). Then `llmc bench throughput TWO-LEVEL --against FLOAT16` runs the two
  checkpoints run by run on the native executor and reports decode tok/s and their ratio.

  The native executor's int4 panels hold, per group and row, the 4-bit codes, a zero point and either
  an fp32 scale (float16 scales, widened once at load) or an 8-bit scale code plus a quarter of an fp32
  step per 8 groups (two-level): 21 against 18.5 bytes per 32 weights in groups of 32, 13 against 10.5
  in groups of 16. Decode reads every weight once a token, so where memory bandwidth limits it the
  two-level engine reads fewer bytes.

How to run (on a quiet machine: nothing else busy)
  .venv/bin/python benchmarks/two_level_speed.py                       # groups of 32 and of 16
  .venv/bin/python benchmarks/two_level_speed.py --group-size 32 --json /tmp/two-level.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quantize_memory import MODEL_SHAPE, ensure_checkpoint  # noqa: E402

LLMC = [sys.executable, "-m", "llmc"]


def log(msg: str) -> None:
    print(f"[two_level_speed] {msg}", file=sys.stderr, flush=True)


def quantize(model: Path, out: Path, group_size: int, two_level: bool) -> None:
    if (out / "config.json").is_file():
        log(f"reusing {out}")
        return
    cmd = [*LLMC, "quantize", str(model), "-o", str(out), "--scheme", "w4a16", "--algo", "rtn", "--observer",
           "minmax", "--group-size", str(group_size), "--head", "int4", "--force",
           "--two-level-scales" if two_level else "--float16-scales"]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/llmc-tinyllama-4l-random"))
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the random checkpoint (default: 4)")
    p.add_argument("--group-size", type=int, action="append", default=None, help="default: 32 and 16")
    p.add_argument("--batch", default="1,8", help="batch sizes for llmc bench throughput (default: 1,8)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="write every result here")
    args = p.parse_args()
    shape = {**MODEL_SHAPE, "num_hidden_layers": args.layers}
    ensure_checkpoint(args.model_dir, shape)
    results = {}
    for gs in args.group_size or [32, 16]:
        paths = {two: args.model_dir.with_name(f"{args.model_dir.name}-w4a16-g{gs}{'-s8' if two else ''}")
                 for two in (False, True)}
        for two, out in paths.items():
            quantize(args.model_dir, out, gs, two)
        raw = paths[True].with_name(paths[True].name + "-throughput.json")
        raw.unlink(missing_ok=True)
        cmd = [*LLMC, "bench", "throughput", str(paths[True]), "--against", str(paths[False]), "--batch", args.batch,
               "--input-len", "32", "--output-len", str(args.output_len), "--repeat", str(args.repeat),
               "--json", str(raw)]
        log(" ".join(cmd[2:]))
        print(f"## groups of {gs}: two-level scales, against float16 scales\n", flush=True)
        subprocess.run(cmd, check=True)                   # its table to stdout
        results[f"g{gs}"] = json.loads(raw.read_text())
        print(flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
