"""llmc serve against llama.cpp's llama-server under online load, in one run: output tokens/s,
mean and p99 TTFT at 1, 8 and 32 concurrent clients.

Both serve the peer harness's SmolLM-135M-shaped random-init checkpoint ("small") at 8 bits with
--threads threads: llama-server the GGUF Q8_0, llmc the same checkpoint quantized RTN to
--llmc-scheme (w8a16 or w8a8, `--head int8`), made exactly as benchmarks/vs_llamacpp.py makes them
(and reused from its --work and the harness's model directory). Both are measured by the same
client, `llmc bench serve`: a closed loop keeping C requests in flight, max(8, --requests-per-client
x C) requests of --input-len random token ids, each asking for exactly --output-len tokens
(temperature 0, ignore_eos, streamed).

  llama-server  -m GGUF -t T -tb T -np N -c N*CTX --host 127.0.0.1 --port FREE --no-webui
  llmc serve    MODEL --threads T --max-num-seqs N --host 127.0.0.1 --port FREE

N is the largest concurrency of the run (neither server queues behind fewer slots than clients) and
CTX = input + output + 64 tokens per slot.

One server at a time (the machine has 2 cores): for each concurrency, for each repeat, each server
is started, warmed up with --warmup requests, measured after waiting for a quiet machine, and
stopped by its pid (SIGTERM, a bounded wait, SIGKILL); llama-server first on even repeats, llmc
first on odd ones. Every (concurrency, repeat) has its own prompt seed, the same for both systems,
and the warm-up its own, so no server ever sees a prompt twice (both cache prompts).

With several repeats the table shows the median of each number; ratios are llmc / llama-server.
A measurement with a failed request, an output of another length than asked, or a server that did
not start is flagged in the table and fails the goal; the exit code is then 1.
Goal: at 32 clients, llmc >= 1.5x llama-server's output tokens/s with at most half its mean TTFT.

    .venv/bin/python benchmarks/serve_vs_llamacpp.py --json serve.json
    .venv/bin/python benchmarks/serve_vs_llamacpp.py --concurrency 1,2 --input-len 32 --output-len 8 \\
        --requests-per-client 2 --work /tmp/vs          # a smoke run
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_llamacpp as vs  # noqa: E402  (the model making, llama.cpp build and quiet-machine wait)

SHAPE = "small"
GGUF_TYPE = "Q8_0"
LLMC_SCHEMES = ("w8a16", "w8a8")            # the 8-bit formats of vs_llamacpp.LLMC_FORMATS
CTX_MARGIN = 64                             # tokens per llama-server slot beyond input + output
MIN_REQUESTS = 8
GOAL = {"concurrency": 32, "throughput_ratio": 1.5, "ttft_ratio": 0.5}
READY_TIMEOUT_S = 600.0                     # from a server's start until its ready endpoint answers 200
STOP_TIMEOUT_S = 30.0                       # from SIGTERM until it has exited (then SIGKILL)
REQUEST_TIMEOUT_S = 900.0                   # one request (bench serve --timeout)


# ---- the servers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class System:
    name: str
    ready_path: str                                             # GET it until 200
    command: Callable[[argparse.Namespace, int], list]          # (args, port) -> argv


def llama_server_command(args: argparse.Namespace, port: int) -> list:
    slots = max(args.concurrency)
    return [args.bin / "llama-server", "-m", args.gguf, "-t", args.threads, "-tb", args.threads, "-np", slots,
            "-c", slots * args.slot_ctx, "--host", "127.0.0.1", "--port", port, "--no-webui"]


def llmc_serve_command(args: argparse.Namespace, port: int) -> list:
    return [*vs.LLMC, "serve", args.llmc_model, "--threads", args.threads, "--max-num-seqs", max(args.concurrency),
            "--host", "127.0.0.1", "--port", port]


SYSTEMS = (System("llama-server", "/health", llama_server_command), System("llmc", "/ready", llmc_serve_command))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 6) -> str:
    return " | ".join(line for line in path.read_text(errors="replace").splitlines()[-lines:] if line.strip())


@contextmanager
def running(command: list, url: str, ready_path: str, log_path: Path) -> Iterator[int]:
    """The server as a child process (output in log_path) until the block ends; yields its pid."""
    import httpx
    argv = [str(c) for c in command]
    with open(log_path, "w") as logf:
        logf.write("$ " + " ".join(argv) + "\n")
        logf.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{Path(argv[0]).name} exited {proc.returncode} before it was ready: "
                                       f"{log_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{Path(argv[0]).name} not ready after {READY_TIMEOUT_S:g} s (log {log_path})")
                try:
                    if httpx.get(url + ready_path, timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            yield proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---- one measurement --------------------------------------------------------------------------------

def bench_serve(args: argparse.Namespace, url: str, concurrency: int, requests: int, output_len: int,
                seed: int) -> dict:
    """`llmc bench serve --url` with the run's prompts; its whole JSON result."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "r.json"
        waves = -(-requests // concurrency)
        vs.run([*vs.LLMC, "bench", "serve", "--url", url, "--tokenizer", args.hf, "--input-len", args.input_len,
                "--output-len", output_len, "--num-requests", requests, "--concurrency", concurrency,
                "--seed", seed, "--timeout", REQUEST_TIMEOUT_S, "--json", f],
               timeout=waves * REQUEST_TIMEOUT_S + 600)
        return json.loads(f.read_text())


def problems(result: dict | None, error: str | None, output_len: int) -> list[str]:
    """What makes a measurement's numbers not the whole story."""
    if error is not None:
        return [f"error: {error}"]
    m = result["metrics"]
    out = [f"{m['failed']['value']} requests failed"] if m["failed"]["value"] else []
    short = [s["output_tokens"] for s in result["samples"]["requests"] if s["ok"] and s["output_tokens"] != output_len]
    if short:
        out.append(f"{len(short)} outputs of {min(short)}..{max(short)} tokens, not {output_len}")
    return out


def measure(args: argparse.Namespace, system: System, concurrency: int, repeat: int, seed: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = system.command(args, port)
    requests = max(MIN_REQUESTS, args.requests_per_client * concurrency)
    log_path = args.logs / f"{system.name}-c{concurrency}-r{repeat}.log"
    rec: dict[str, Any] = {"system": system.name, "concurrency": concurrency, "repeat": repeat, "seed": seed,
                           "warmup_seed": seed + 1, "num_requests": requests, "command": [str(c) for c in command],
                           "log": str(log_path), "other_load": None, "warmup": None, "result": None, "error": None}
    vs.log(f"{system.name}: {concurrency} clients, {requests} requests (repeat {repeat}, seed {seed})")
    try:
        with running(command, url, system.ready_path, log_path):
            if args.warmup:
                w = bench_serve(args, url, min(concurrency, args.warmup), args.warmup, min(args.output_len, 16),
                                seed + 1)
                rec["warmup"] = w["metrics"]
            rec["other_load"] = vs.wait_quiet(True)
            rec["result"] = bench_serve(args, url, concurrency, requests, args.output_len, seed)
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        rec["error"] = " ".join(str(e).split())[:500]
    rec["problems"] = problems(rec["result"], rec["error"], args.output_len)
    if rec["result"] is not None:
        m = rec["result"]["metrics"]
        ttft = {q: (m.get(f"ttft_ms_{q}") or {}).get("value") or float("nan") for q in ("mean", "p99")}
        vs.log(f"  {m['output_throughput']['value']:.1f} tok/s, TTFT mean {ttft['mean']:.0f} ms "
               f"p99 {ttft['p99']:.0f} ms, {m['failed']['value']} failed")
    for p in rec["problems"]:
        vs.log(f"  {p}")
    return rec


# ---- the report --------------------------------------------------------------------------------------

def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: list[dict], concurrency: list[int]) -> list[dict]:
    """Per concurrency and system: medians over the repeats, failures summed; ratios llmc / llama-server."""
    rows = []
    for c in concurrency:
        row: dict[str, Any] = {"concurrency": c}
        for s in SYSTEMS:
            rs = [r for r in runs if r["system"] == s.name and r["concurrency"] == c]
            ms = [r["result"]["metrics"] for r in rs if r["result"] is not None]
            row[s.name] = {
                "output_tok_s": _median([m["output_throughput"]["value"] for m in ms]),
                "ttft_mean_ms": _median([(m.get("ttft_ms_mean") or {}).get("value") for m in ms]),
                "ttft_p99_ms": _median([(m.get("ttft_ms_p99") or {}).get("value") for m in ms]),
                "requests": sum(r["num_requests"] for r in rs),
                "failed": sum(m["failed"]["value"] for m in ms) + sum(r["num_requests"] for r in rs if not r["result"]),
                "repeats": len(ms), "problems": [p for r in rs for p in r["problems"]]}
        llama, llmc = row["llama-server"], row["llmc"]
        row["throughput_ratio"] = _ratio(llmc["output_tok_s"], llama["output_tok_s"])
        row["ttft_mean_ratio"] = _ratio(llmc["ttft_mean_ms"], llama["ttft_mean_ms"])
        row["ttft_p99_ratio"] = _ratio(llmc["ttft_p99_ms"], llama["ttft_p99_ms"])
        row["clean"] = not llama["problems"] and not llmc["problems"]
        rows.append(row)
    return rows


def verdict(summary: list[dict]) -> dict:
    row = next((r for r in summary if r["concurrency"] == GOAL["concurrency"]), None)
    if row is None:
        return {**GOAL, "met": None, "why": f"{GOAL['concurrency']} clients not measured"}
    tp, ttft = row["throughput_ratio"], row["ttft_mean_ratio"]
    if not row["clean"] or tp is None or ttft is None:
        return {**GOAL, "met": False, "why": "a measurement failed (see the problems)"}
    met = tp >= GOAL["throughput_ratio"] and ttft <= GOAL["ttft_ratio"]
    return {**GOAL, "met": met, "why": f"{tp:.2f}x output tok/s, {ttft:.2f}x mean TTFT"}


def _f(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def print_report(args: argparse.Namespace, env: dict, summary: list[dict], goal: dict) -> None:
    print(f"\n## llmc serve vs llama-server: small (SmolLM-135M shape), 8-bit, {args.threads} threads, "
          f"{env['started']}\n")
    print(f"{args.input_len} prompt tokens (random ids) -> {args.output_len} output tokens per request, closed loop "
          f"of C clients, max({MIN_REQUESTS}, {args.requests_per_client} x C) requests; llama-server {GGUF_TYPE} "
          f"-np {max(args.concurrency)} vs llmc {args.llmc_scheme} --max-num-seqs {max(args.concurrency)}"
          + (f"; medians of {args.repeat} repeats" if args.repeat > 1 else "") + ". Ratios: llmc / llama-server.\n")
    print("| clients | requests | llama-server tok/s | llmc tok/s | ratio | llama-server mean TTFT ms | "
          "llmc mean TTFT ms | ratio | llama-server p99 TTFT ms | llmc p99 TTFT ms | ratio | failed (llama / llmc) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        a, b = r["llama-server"], r["llmc"]
        flag = "" if r["clean"] else " **!**"
        cells = [f"{r['concurrency']}{flag}", a["requests"], _f(a["output_tok_s"]), _f(b["output_tok_s"]),
                 _x(r["throughput_ratio"]), _f(a["ttft_mean_ms"], ".0f"), _f(b["ttft_mean_ms"], ".0f"),
                 _x(r["ttft_mean_ratio"]), _f(a["ttft_p99_ms"], ".0f"), _f(b["ttft_p99_ms"], ".0f"),
                 _x(r["ttft_p99_ratio"]), f"{a['failed']} / {b['failed']}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    for r in summary:
        for s in SYSTEMS:
            for p in r[s.name]["problems"]:
                print(f"\n**!** {r['concurrency']} clients, {s.name}: {p}")
    state = {True: "PASS", False: "FAIL", None: "not measured"}[goal["met"]]
    print(f"\ngoal at {GOAL['concurrency']} clients (llmc >= {GOAL['throughput_ratio']}x llama-server's output "
          f"tok/s with <= {GOAL['ttft_ratio']}x its mean TTFT): **{state}**, {goal['why']}\n")
    print(f"- CPU: {env['cpu']} ({env['cpu_count']} cores), {args.threads} threads per server")
    print(f"- llmc {env['llmc']} (git {env['llmc_git']}), Python {env['python']}, torch {env['torch']}; "
          f"llama.cpp {env['llama_cpp']}")
    print(f"- models: {args.gguf}; {args.llmc_model} ({args.llmc_scheme}, RTN, head int8); from {args.hf}")
    print(f"- other processes' load before each measurement: at most "
          f"{_f(max((x for x in env['other_loads'] if x is not None), default=None), '.2f')} cores")


# ---- the run -------------------------------------------------------------------------------------------

def versions(args: argparse.Namespace) -> dict:
    from llmc.bench.environment import environment
    git = subprocess.run(["git", "-C", vs.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", vs.ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    llama = subprocess.run([args.bin / "llama-server", "--version"], capture_output=True, text=True)
    line = next((x for x in (llama.stdout + llama.stderr).splitlines() if x.startswith("version")), "unknown")
    return {**environment(args.threads), "llmc_git": git.stdout.strip() + ("+dirty" if dirty else ""),
            "llama_cpp": line.removeprefix("version:").strip()}


def prepare(args: argparse.Namespace) -> None:
    args.bin, models = vs.llama_paths(args.peers)
    vs.ensure_llama_cpp(args.peers, args.bin)
    if not (args.bin / "llama-server").exists():
        vs.log("llama-server missing: running the peer harness's setup.sh")
        vs.run(["bash", args.peers / "setup.sh"], timeout=3 * 3600)
    if not (args.bin / "llama-server").exists():
        raise SystemExit(f"no llama-server in {args.bin} after the peer harness's setup.sh")
    args.work.mkdir(parents=True, exist_ok=True)
    args.hf = vs.ensure_checkpoint(args.peers, models, SHAPE)
    args.gguf = vs.ensure_gguf(args.peers, args.bin, models, SHAPE, GGUF_TYPE)
    args.llmc_model = vs.ensure_llmc(args.work, args.hf, SHAPE, args.llmc_scheme)
    args.logs = args.work / "serve-logs"
    args.logs.mkdir(exist_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--concurrency", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="measurements of every (system, concurrency)")
    ap.add_argument("--requests-per-client", type=int, default=4,
                    help=f"requests per level = this x clients, at least {MIN_REQUESTS}")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids)")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens of every request")
    ap.add_argument("--seed", type=int, default=0, help="the first prompt seed (each measurement has its own)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests after each server start (0: none)")
    ap.add_argument("--llmc-scheme", choices=LLMC_SCHEMES, default="w8a16", help="llmc's 8-bit format")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", type=Path, default=vs.ROOT.parent / "shared" / "peers", help="the peer harness")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmc-vs-llamacpp",
                    help="where llmc's models are made (reused; vs_llamacpp.py's default) and server logs go")
    ap.add_argument("--json", type=Path, help="write every number, with every bench serve result, here")
    ap.add_argument("--prepare-only", action="store_true", help="make the models, measure nothing")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    positive = [args.repeat, args.requests_per_client, args.input_len, args.output_len, args.threads]
    if not args.concurrency or min(args.concurrency + positive) < 1 or args.warmup < 0:
        ap.error("--concurrency, --repeat, --requests-per-client, --input-len, --output-len and --threads "
                 "must be positive, --warmup at least 0")
    args.slot_ctx = args.input_len + args.output_len + CTX_MARGIN
    prepare(args)
    if args.prepare_only:
        return 0
    env = {**versions(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runs, k = [], 0
    for c in args.concurrency:
        for rep in range(args.repeat):
            seed = args.seed + 2 * k                 # seed + 1: this measurement's warm-up
            k += 1
            for system in (SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]):
                runs.append(measure(args, system, c, rep, seed))
    env["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    env["other_loads"] = [r["other_load"] for r in runs]
    summary = summarize(runs, args.concurrency)
    goal = verdict(summary)
    print_report(args, env, summary, goal)
    if args.json:
        from llmc.io import write_json_atomic
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json_atomic(args.json, {"config": config, "env": env, "summary": summary, "goal": goal, "runs": runs})
    return 0 if all(r["clean"] for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
