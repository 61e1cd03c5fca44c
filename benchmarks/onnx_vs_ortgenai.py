"""The onnx target against the cpu target and against ONNX Runtime GenAI's own int4 build, in one run.

On the peer harness's random-init SmolLM-135M-shaped checkpoint ("small"; --shape medium for the
TinyLlama-1.1B shape), at 4 bits:

  llmc cpu        `llmc quantize --scheme w4a16 --group-size 32 --head int4`, `llmc compile`
                  (the native executor), measured with `llmc bench throughput`
  llmc onnx       the same checkpoint, `llmc compile --target onnx`, run by llmc's runtime on ONNX
                  Runtime (DequantizeLinear + MatMul fused into MatMulNBits, accuracy level 1: fp32
                  activations), measured with `llmc bench throughput`
  genai(llmc)     ONNX Runtime GenAI generating from that same onnx engine, unchanged (its default
                  accuracy level 4: int8 activations in MatMulNBits)
  genai int4      the peer harness's build: `python -m onnxruntime_genai.models.builder -p int4 -e cpu`
                  (its own graph: GroupQueryAttention, MatMulNBits, block 32, accuracy level 4)

Batch 1: a 128-token random prompt, 128 tokens generated greedily; decode tok/s (median of
--repeat runs after a warm-up) and prefill time. Batch 8 for the two llmc targets. Every measurement
waits for a quiet machine and all run at --threads.

    .venv/bin/python benchmarks/onnx_vs_ortgenai.py --json onnx.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_llamacpp as vs  # noqa: E402  (the checkpoint making, run() and the quiet-machine wait)

ROOT = Path(__file__).resolve().parents[1]


def ensure(out: Path, cmd: list) -> Path:
    if not (out / "config.json").exists() and not (out / "engine.json").exists():
        vs.log(" ".join(map(str, cmd[2:5])) + f" ... -> {out.name}")
        vs.run([*cmd, "--force"], timeout=7200)
    return out


def ensure_genai_int4(hf: Path, out: Path) -> Path:
    if not (out / "genai_config.json").exists():
        vs.log(f"ONNX Runtime GenAI builder int4 -> {out}")
        vs.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", "int4",
                "-e", "cpu", "-c", out.parent / ".genai-cache"], timeout=7200)
    return out


def llmc_throughput(model: Path, batches: list[int], args) -> dict[int, dict]:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "r.json"
        vs.run([*vs.LLMC, "bench", "throughput", model, "--batch", ",".join(map(str, batches)),
                "--input-len", args.input_len, "--output-len", args.output_len, "--repeat", args.repeat,
                "--warmup", 1, "--threads", args.threads, "--json", f], timeout=7200)
        res = vs.batch_summaries(json.loads(f.read_text()))
    return {r["batch"]: {"decode_tok_s": r["decode_tok_s"]["median"], "prefill_s": r["ttft_ms"]["median"] / 1e3}
            for r in res}


def genai_decode(path: Path, args) -> dict:
    """Batch 1 as the peer harness measures it: append the prompt (prefill), then one token at a time."""
    import numpy as np
    import onnxruntime_genai as og
    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads,
                                                                           "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    vocab = json.loads((path / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(11)
    prefill, decode = [], []
    for rep in range(args.repeat + 1):                            # the first is a warm-up
        prompt = rng.integers(100, vocab - 100, size=args.input_len).tolist()
        params = og.GeneratorParams(model)
        total = args.input_len + args.output_len
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        g = og.Generator(model, params)
        t0 = time.perf_counter()
        g.append_tokens(prompt)
        t1 = time.perf_counter()
        n = 0
        while not g.is_done():
            g.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        if rep:
            prefill.append(t1 - t0)
            decode.append(n / (t2 - t1))
    return {1: {"decode_tok_s": statistics.median(decode), "prefill_s": statistics.median(prefill)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small")
    p.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "peers")
    p.add_argument("--models", type=Path, default=Path("/tmp/peers-models"))
    p.add_argument("--work", type=Path, default=Path("/tmp/onnx-vs"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch", default="1,8", help="batch sizes for the two llmc targets")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    hf = vs.ensure_checkpoint(args.peers, args.models, args.shape)
    q = ensure(args.work / f"{args.shape}-w4a16", [*vs.LLMC, "quantize", hf, "-o", args.work / f"{args.shape}-w4a16",
                                                   "--scheme", "w4a16", "--group-size", "32", "--head", "int4"])
    cpu = ensure(args.work / f"{args.shape}-w4a16.cpu", [*vs.LLMC, "compile", q, "-o", args.work / f"{args.shape}-w4a16.cpu"])
    onnx = ensure(args.work / f"{args.shape}-w4a16.onnx",
                  [*vs.LLMC, "compile", q, "-o", args.work / f"{args.shape}-w4a16.onnx", "--target", "onnx"])
    peer = ensure_genai_int4(hf, args.models / args.shape / "ort-int4")
    runs = [("llmc cpu (w4a16 g32, native)", lambda: llmc_throughput(cpu, batches, args)),
            ("llmc onnx (w4a16 g32, ORT MatMulNBits)", lambda: llmc_throughput(onnx, batches, args)),
            ("ORT GenAI on llmc's onnx engine", lambda: genai_decode(onnx, args)),
            ("ORT GenAI int4 build (peer)", lambda: genai_decode(peer, args))]
    results = {}
    for name, fn in runs:
        load = vs.wait_quiet(not args.no_wait)
        vs.log(f"{name} (other load {load:.2f} cores)")
        results[name] = fn()
    size = {name: sum(f.stat().st_size for f in d.glob("*") if f.suffix in (".safetensors", ".onnx", ".data"))
            for name, d in (("llmc cpu (w4a16 g32, native)", cpu), ("llmc onnx (w4a16 g32, ORT MatMulNBits)", onnx),
                            ("ORT GenAI int4 build (peer)", peer))}
    peer_tok = results["ORT GenAI int4 build (peer)"][1]["decode_tok_s"]
    print(f"\n{args.shape}: {args.input_len}-token prompt, {args.output_len} generated, {args.threads} threads, "
          f"medians of {args.repeat}\n")
    print(f"| engine | batch | decode tok/s | vs ORT GenAI int4 | prefill / TTFT ms |\n|---|---:|---:|---:|---:|")
    for name, by_batch in results.items():
        for b, r in sorted(by_batch.items()):
            ratio = f"{r['decode_tok_s'] / peer_tok:.2f}x" if b == 1 else ""
            print(f"| {name} | {b} | {r['decode_tok_s']:.1f} | {ratio} | {r['prefill_s'] * 1000:.0f} |")
    print("\nweights on disk: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in size.items()))
    if args.json:
        from llmc.bench.environment import environment
        from llmc.io import write_json_atomic
        write_json_atomic(args.json, {"shape": args.shape, "threads": args.threads, "input_len": args.input_len,
                                      "output_len": args.output_len, "results": results, "bytes": size,
                                      "environment": environment()})


if __name__ == "__main__":
    main()
