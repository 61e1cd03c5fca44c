"""llmc against llama.cpp on this machine, in one run: decode and prefill at equal bits, batch decode,
and the same under load.

What it compares (random-init checkpoints of the peer harness: SmolLM-135M shape "small" and
TinyLlama-1.1B shape "medium", the same weights for both engines):

  16-bit   llama.cpp F16           llmc bf16   (`llmc compile --dtype bf16`)
  8-bit    llama.cpp Q8_0          llmc w8a16, w8a8       (RTN, `--head int8`)
  4-bit    llama.cpp Q4_0          llmc w4a16 g32, w4a8 g32 (RTN, `--head int8`)

  batch 1   llama-bench tg128 after a 128-token context (`-p 0 -n 128 -d 128`) against
            `llmc bench throughput --batch 1 --input-len 128 --output-len 128` (decode tok/s);
            llama-bench pp512 (`-p 512 -n 0`) against `--input-len 512 --output-len 1` (prefill tok/s)
  batch N   llama-batched-bench (`-npp 128 -ntg 128 -npl 8,32`, its S_TG) against
            `llmc bench throughput --batch 8,32 --input-len 128 --output-len 128` (decode tok/s)

Every pair runs back to back (llama.cpp, then llmc), pairs in turn, after waiting for a quiet
machine; both at --threads. The bandwidth limit of an llmc format is the memory bandwidth measured
in the same run (a read-only sum over 512 MiB, best of 5) divided by the bytes of the weights a
decode step reads (every matrix and norm; the embedding table only when it is also the head).

--contention runs everything a second time with two busy-loop processes on the cores (started and
stopped by pid) and reports how much of its quiet speed each engine keeps.

Where things come from: llama.cpp is built by the peer harness (`<peers>/setup.sh`, about 20 minutes
on 2 cores, reused when $PEERS_BUILD/llama.cpp-build/bin has it), the checkpoints by its
make_models.py into $PEERS_MODELS (default /tmp/peers-models), the GGUFs by llama.cpp's converter
(through <peers>/gguf_convert.py) and llama-quantize into <models>/<shape>/gguf/ (the paths the
harness uses, so either reuses the other's files); llmc's models go to --work.

    .venv/bin/python benchmarks/vs_llamacpp.py                      # small and medium, ~1 h
    .venv/bin/python benchmarks/vs_llamacpp.py --shapes small --contention --json vs.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llmc.bench.throughput import batch_summaries  # noqa: E402  (a result file's per-batch medians)

LLMC = [sys.executable, "-m", "llmc"]
PAIRS = [("16-bit", "F16", "bf16"), ("8-bit", "Q8_0", "w8a16"), ("8-bit", "Q8_0", "w8a8"),
         ("4-bit", "Q4_0", "w4a16"), ("4-bit", "Q4_0", "w4a8")]
LLMC_FORMATS = {   # name -> the llmc command that makes it from the checkpoint
    "bf16": ["compile", "--dtype", "bf16"],
    "w8a16": ["quantize", "--scheme", "w8a16", "--head", "int8"],
    "w8a8": ["quantize", "--scheme", "w8a8", "--head", "int8"],
    "w4a16": ["quantize", "--scheme", "w4a16", "--group-size", "32", "--head", "int8"],
    "w4a8": ["quantize", "--scheme", "w4a8", "--group-size", "32", "--head", "int8"],
}
QUIET_CORES = 0.25            # other processes' CPU use below which the machine counts as quiet
QUIET_WAIT_S = 120


def log(msg: str) -> None:
    print(f"[vs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-12:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... exited {r.returncode}:\n{tail}")
    return r


# ---- the machine ---------------------------------------------------------------------------------

def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    return sum(int(p) for p in parts[:3]) + sum(int(p) for p in parts[5:8])


def other_load(seconds: float = 1.0) -> float:
    """Cores kept busy by every process over `seconds` (this one sleeps meanwhile)."""
    a = _busy_jiffies()
    time.sleep(seconds)
    return (_busy_jiffies() - a) / os.sysconf("SC_CLK_TCK") / seconds


def wait_quiet(enabled: bool) -> float:
    """Wait (up to QUIET_WAIT_S) until other processes use under QUIET_CORES; returns the last reading."""
    load = other_load()
    if not enabled:
        return load
    waited = 0.0
    while load > QUIET_CORES and waited < QUIET_WAIT_S:
        log(f"waiting for a quiet machine ({load:.2f} cores busy)")
        time.sleep(4)
        waited += 5
        load = other_load()
    return load


def memory_bandwidth(threads: int) -> float:
    """GB/s of a read-only sum over 512 MiB of fp32, best of 5 (torch, `threads` threads)."""
    import torch
    torch.set_num_threads(threads)
    a = torch.ones(128 * 2**20)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum().item()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


class BusyLoops:
    """Two processes spinning on the CPU, stopped by pid."""

    def __init__(self, count: int = 2) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]

    def stop(self) -> None:
        for p in self.procs:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=10)


# ---- what gets measured ------------------------------------------------------------------------------

def llama_paths(peers: Path) -> tuple[Path, Path]:
    build = Path(os.environ.get("PEERS_BUILD", "/tmp/peers-build"))
    models = Path(os.environ.get("PEERS_MODELS", "/tmp/peers-models"))
    return build / "llama.cpp-build" / "bin", models


def ensure_llama_cpp(peers: Path, bin_dir: Path) -> None:
    need = ("llama-bench", "llama-batched-bench", "llama-quantize")
    if all((bin_dir / b).exists() for b in need):
        return
    log("building llama.cpp with the peer harness (about 20 minutes on 2 cores)")
    run(["bash", peers / "setup.sh"], timeout=3 * 3600)


def peers_python() -> Path:
    return Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv")) / "bin" / "python"


def ensure_checkpoint(peers: Path, models: Path, shape: str) -> Path:
    hf = models / shape / "hf"
    if not (hf / "model.safetensors").exists():
        log(f"making the {shape} checkpoint (peer harness make_models.py)")
        run([peers_python(), peers / "make_models.py", "--out", models, "--shapes", shape], timeout=3600)
    return hf


def ensure_gguf(peers: Path, bin_dir: Path, models: Path, shape: str, qtype: str) -> Path:
    out = models / shape / "gguf" / f"{shape}-{qtype.lower()}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if qtype == "F16":
        src = Path(os.environ.get("PEERS_BUILD", "/tmp/peers-build")).glob("llama-cpp-python-*/vendor/llama.cpp")
        log(f"converting {shape} to GGUF F16")
        run([peers_python(), peers / "gguf_convert.py", next(src), models / shape / "hf", "--outtype", "f16",
             "--outfile", tmp], timeout=3600)
    else:
        log(f"llama-quantize {shape} {qtype}")
        run([bin_dir / "llama-quantize", ensure_gguf(peers, bin_dir, models, shape, "F16"), tmp, qtype, "2"],
            timeout=3600)
    tmp.rename(out)
    return out


def ensure_llmc(work: Path, hf: Path, shape: str, fmt: str) -> Path:
    out = work / f"{shape}-{fmt}"
    if (out / "config.json").exists() or (out / "engine.json").exists():
        return out
    verb, *opts = LLMC_FORMATS[fmt]
    log(f"llmc {verb} {shape} -> {fmt}")
    run([*LLMC, verb, hf, "-o", out, *opts, "--force"], timeout=3600)
    return out


def decode_bytes(path: Path) -> int:
    """Bytes of the weights one decode step reads: every weight of the graph, but the embedding
    table unless the head reads it too (a lookup reads one row)."""
    from llmc.loader import load_model
    from llmc.quantized.formats import QuantizedWeight
    m = load_model(path)
    head = next(n.inputs[1] for n in m.graph.nodes if n.op == "logits")
    total = 0
    for name in m.graph.weight_names():
        if name == "model.embed_tokens.weight" and name != head:
            continue
        w = m.weights.get(name)
        total += w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
    return total


def llama_bench(bin_dir: Path, gguf: Path, args: list, threads: int, repeat: int) -> dict:
    r = run([bin_dir / "llama-bench", "-m", gguf, *args, "-t", threads, "-r", repeat, "-o", "json"], timeout=3600)
    row = json.loads(r.stdout)[0]
    xs = row["samples_ts"]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def llama_batched(bin_dir: Path, gguf: Path, batches: list[int], threads: int) -> dict[int, float]:
    ctx = max(batches) * 256 + 256
    r = run([bin_dir / "llama-batched-bench", "-m", gguf, "-c", ctx, "-b", 2048, "-ub", 512, "-npp", 128,
             "-ntg", 128, "-npl", ",".join(map(str, batches)), "-t", threads, "--output-format", "jsonl"],
            timeout=7200)
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[int(row["pl"])] = float(row["speed_tg"])
    return out


def llmc_bench(model: Path, batches: list[int], input_len: int, output_len: int, threads: int,
               repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "r.json"
        run([*LLMC, "bench", "throughput", model, "--batch", ",".join(map(str, batches)), "--input-len", input_len,
             "--output-len", output_len, "--repeat", repeat, "--warmup", 1, "--threads", threads,
             "--kernels", "native", "--json", f], timeout=7200)
        return {"results": batch_summaries(json.loads(f.read_text()))}


def measure(args, shapes: dict[str, dict], loaded: bool) -> dict:
    """Every pair of every shape, interleaved; returns the numbers by shape."""
    res: dict[str, Any] = {}
    t, r = args.threads, args.repeat
    for shape, files in shapes.items():
        if loaded and shape not in args.contention_shapes:
            continue
        rows, done_llama = [], {}
        for bits, qtype, fmt in PAIRS:
            gguf, model = files["gguf"][qtype], files["llmc"][fmt]
            if qtype not in done_llama:
                load = wait_quiet(not loaded)
                log(f"{shape} llama.cpp {qtype}: tg128 after 128, pp512")
                done_llama[qtype] = {"tg128": llama_bench(args.bin, gguf, ["-p", 0, "-n", 128, "-d", 128], t, r),
                                     "pp512": llama_bench(args.bin, gguf, ["-p", 512, "-n", 0], t, r),
                                     "other_load": load}
            load = wait_quiet(not loaded)
            log(f"{shape} llmc {fmt}: decode after 128, prefill 512")
            dec = llmc_bench(model, [1], 128, 128, t, r)["results"][0]
            pre = llmc_bench(model, [1], 512, 1, t, r)["results"][0]
            rows.append({"bits": bits, "llama": qtype, "llmc": fmt, "llama_cpp": done_llama[qtype],
                         "llmc_decode": dec["decode_tok_s"], "llmc_prefill": pre["prefill_tok_s"],
                         "decode_profile_ms": dec.get("decode_profile_ms"), "other_load": load,
                         "decode_bytes": files["bytes"][fmt]})
        batched = []
        if args.batches and shape in args.batched_shapes and not loaded:
            for bits, qtype, fmt in PAIRS:
                wait_quiet(not loaded)
                log(f"{shape} batch {args.batches}: llama-batched-bench {qtype}, llmc {fmt}")
                lb = llama_batched(args.bin, files["gguf"][qtype], args.batches, t)
                lm = llmc_bench(files["llmc"][fmt], args.batches, 128, 128, t, max(1, r - 1))
                for b in lm["results"]:
                    batched.append({"bits": bits, "llama": qtype, "llmc": fmt, "batch": b["batch"],
                                    "llama_cpp_tg": lb.get(b["batch"]), "llmc_decode": b["decode_tok_s"]})
        res[shape] = {"batch1": rows, "batched": batched}
    return res


# ---- the report ----------------------------------------------------------------------------------------

def print_report(res: dict, bandwidth: float, title: str) -> None:
    print(f"\n## {title}\n")
    print(f"memory bandwidth (read, same run): {bandwidth:.1f} GB/s\n")
    print("| shape | bits | llama.cpp | tg128 | pp512 | llmc | decode | ratio | bandwidth limit | of limit | "
          "prefill | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, r in res.items():
        for row in r["batch1"]:
            lt, lp = row["llama_cpp"]["tg128"]["median"], row["llama_cpp"]["pp512"]["median"]
            d, p = row["llmc_decode"]["median"], row["llmc_prefill"]["median"]
            limit = bandwidth * 1e9 / row["decode_bytes"]
            print(f"| {shape} | {row['bits']} | {row['llama']} | {lt:.1f} | {lp:.1f} | {row['llmc']} | {d:.1f} | "
                  f"{d / lt:.2f}x | {limit:.1f} | {100 * d / limit:.0f}% | {p:.1f} | {p / lp:.2f}x |")
    batched = [(shape, b) for shape, r in res.items() for b in r["batched"]]
    if batched:
        print("\n| shape | batch | llama.cpp | tok/s | llmc | decode tok/s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for shape, b in batched:
            lt = b["llama_cpp_tg"]
            d = b["llmc_decode"]["median"]
            print(f"| {shape} | {b['batch']} | {b['llama']} | {lt or 0:.1f} | {b['llmc']} | {d:.1f} | "
                  f"{d / lt if lt else float('nan'):.2f}x |")


def print_contention(quiet: dict, loaded: dict) -> None:
    print("\n## Under load (two busy loops): share of the quiet speed each engine keeps\n")
    print("| shape | llama.cpp | quiet | loaded | kept | llmc | quiet | loaded | kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in loaded:
        for q, l in zip(quiet[shape]["batch1"], loaded[shape]["batch1"]):
            lq, ll = q["llama_cpp"]["tg128"]["median"], l["llama_cpp"]["tg128"]["median"]
            mq, ml = q["llmc_decode"]["median"], l["llmc_decode"]["median"]
            print(f"| {shape} | {q['llama']} | {lq:.1f} | {ll:.1f} | {100 * ll / lq:.0f}% | {q['llmc']} | {mq:.1f} | "
                  f"{ml:.1f} | {100 * ml / mq:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shapes", default="small,medium", help="small (SmolLM-135M shape), medium (TinyLlama-1.1B)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions of every measurement")
    ap.add_argument("--batches", default="8,32", help="batch decode sizes ('' to skip)")
    ap.add_argument("--batched-shapes", default="small", help="shapes that get the batch decode comparison")
    ap.add_argument("--contention", action="store_true", help="also measure batch 1 with two busy loops running")
    ap.add_argument("--contention-shapes", default="small", help="shapes measured under load")
    ap.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "peers", help="the peer harness")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmc-vs-llamacpp",
                    help="where llmc's models are made (reused)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--prepare-only", action="store_true", help="make the models and GGUFs, measure nothing")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.batched_shapes = set(args.batched_shapes.split(","))
    args.contention_shapes = set(args.contention_shapes.split(","))
    args.bin, models = llama_paths(args.peers)
    ensure_llama_cpp(args.peers, args.bin)
    args.work.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for shape in args.shapes.split(","):
        hf = ensure_checkpoint(args.peers, models, shape)
        files = {"gguf": {q: ensure_gguf(args.peers, args.bin, models, shape, q) for _, q, _ in PAIRS},
                 "llmc": {f: ensure_llmc(args.work, hf, shape, f) for *_, f in PAIRS}}
        files["bytes"] = {f: decode_bytes(p) for f, p in files["llmc"].items()}
        shapes[shape] = files
    if args.prepare_only:
        return
    wait_quiet(True)
    bandwidth = memory_bandwidth(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    quiet = measure(args, shapes, loaded=False)
    print_report(quiet, bandwidth, f"llmc vs llama.cpp, {args.threads} threads, {started}")
    out = {"started": started, "threads": args.threads, "bandwidth_GBps": bandwidth, "quiet": quiet}
    if args.contention:
        busy = BusyLoops()
        try:
            time.sleep(2)
            loaded = measure(args, shapes, loaded=True)
        finally:
            busy.stop()
        print_report(loaded, bandwidth, "the same with two busy loops on the cores")
        print_contention(quiet, loaded)
        out["loaded"] = loaded
    if args.json:
        from llmc.io import write_json_atomic
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
