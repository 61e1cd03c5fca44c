"""CPU decode throughput of llmc against Hugging Face transformers (eager, fp32) on a SmolLM-135M shape.

What it measures
  A random-initialised Llama checkpoint shaped like SmolLM-135M (30 layers, hidden 576, 9 query / 3 KV
  heads, vocab 49152, tied embeddings, fp32, seed 1234) is written as safetensors (to a temporary
  directory, or to --model-dir, reused when it already holds the same shape). Both engines then run
  greedy generation of --gen-len tokens (EOS ignored) after --prompt-len random token ids, at every
  --batch size (default 1 and 8), with the same prompts and torch.set_num_threads(--threads):

  llmc          Runner(kernels="cpu"), all requests added at once. The first step() runs every prefill
                and samples the first token (prefill time); every later step decodes the whole batch.
                decode tok/s = B * (gen_len - 1) / (time of the later steps)
  llmc SCHEME   (with --scheme w8a16 / w4a16) the same on the checkpoint quantized by `llmc quantize`
                (RTN; w4a16 in groups of 128): the weight-only int8 / int4 CPU kernels.
  transformers  AutoModelForCausalLM(dtype=float32, attn_implementation="eager").generate(...).
                Prefill time is a separate generate(max_new_tokens=1) call, so decode is an estimate:
                decode tok/s = B * (gen_len - 1) / (generate time - prefill time)

  Both report end-to-end tok/s = B * gen_len / (whole generation). Each (engine, batch) gets
  --warmup untimed runs, then --repeats timed runs: the table shows medians and min-max. Finally the
  first 32 greedy tokens of llmc and transformers for the batch-1 prompt are compared (reported only:
  a random-init model can have near-ties between logits).

How to run
  .venv/bin/python benchmarks/decode_cpu.py [--json out.json]
  .venv/bin/python benchmarks/decode_cpu.py --scheme w8a16 --scheme w4a16      # quantized engines too
  .venv/bin/python benchmarks/decode_cpu.py --model-dir /tmp/smollm135m-random --quick     # smoke run

The table goes to stdout, progress to stderr; --json writes the environment, configuration and every
sample. See --help for all options.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from llmc.bench.environment import environment as machine_environment
from llmc.io import atomic_directory, write_json_atomic

SEED = 1234
PROMPT_SEED = 4321
BLOCK_SIZE = 16
CHECK_TOKENS = 32
QUICK_GEN_LEN = 32
QUICK_REPEATS = 1
MODEL_SHAPE: dict[str, Any] = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
    rope_theta=10000.0, rms_norm_eps=1e-5,
)


# ----------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Sample:
    """One timed generation of `batch` sequences."""
    prefill_s: float          # llmc: the first step; transformers: a separate generate(max_new_tokens=1)
    decode_s: float           # llmc: the later steps; transformers: generate time - prefill time
    total_s: float            # the whole generation
    batch: int
    gen_len: int
    loadavg_1m: float         # system load right after the run: > threads means the CPU was shared

    @property
    def decode_tok_s(self) -> float:
        return self.batch * (self.gen_len - 1) / self.decode_s if self.decode_s > 0 else math.nan

    @property
    def e2e_tok_s(self) -> float:
        return self.batch * self.gen_len / self.total_s

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "decode_tok_s": self.decode_tok_s, "e2e_tok_s": self.e2e_tok_s}


@dataclass(frozen=True)
class Stat:
    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, xs: list[float]) -> "Stat":
        return cls(statistics.median(xs), min(xs), max(xs))


@dataclass(frozen=True)
class BenchResult:
    engine: str
    batch: int
    samples: tuple[Sample, ...]
    row0_tokens: tuple[int, ...]      # greedy tokens of the first sequence in the last timed run
    setup_s: float                    # llmc: Runner construction; transformers: 0 (model loaded once)
    backend: dict | None = None       # llmc: what ran (target, device, kernel set, kernel variants per op)

    @property
    def prefill_ms(self) -> Stat:
        return Stat.of([s.prefill_s * 1e3 for s in self.samples])

    @property
    def decode_tok_s(self) -> Stat:
        return Stat.of([s.decode_tok_s for s in self.samples])

    @property
    def e2e_tok_s(self) -> Stat:
        return Stat.of([s.e2e_tok_s for s in self.samples])

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "batch": self.batch, "setup_s": self.setup_s,
                "prefill_ms": asdict(self.prefill_ms), "decode_tok_s": asdict(self.decode_tok_s),
                "e2e_tok_s": asdict(self.e2e_tok_s), "row0_tokens": list(self.row0_tokens),
                "samples": [s.to_json() for s in self.samples], "backend": self.backend}


@dataclass(frozen=True)
class TokenCheck:
    compared: int
    match: bool
    first_mismatch: int | None
    llmc: tuple[int, ...]
    transformers: tuple[int, ...]


@dataclass(frozen=True)
class Report:
    env: dict[str, Any]
    config: dict[str, Any]
    results: tuple[BenchResult, ...]
    check: TokenCheck

    def result(self, engine: str, batch: int) -> BenchResult:
        return next(r for r in self.results if r.engine == engine and r.batch == batch)

    @property
    def engines(self) -> list[str]:
        return list(dict.fromkeys(r.engine for r in self.results))

    def ratio(self, batch: int, engine: str = "llmc") -> float:
        return self.result(engine, batch).decode_tok_s.median / self.result("transformers", batch).decode_tok_s.median

    def row0_consistent(self, engine: str) -> bool:
        """Whether the first sequence's greedy tokens are the same at every batch size."""
        runs = [r.row0_tokens for r in self.results if r.engine == engine]
        return all(t == runs[0] for t in runs)

    def to_json(self) -> dict[str, Any]:
        batches = sorted({r.batch for r in self.results})
        return {"env": self.env, "config": self.config, "results": [r.to_json() for r in self.results],
                "decode_ratio_llmc_over_transformers": {str(b): self.ratio(b) for b in batches},
                "decode_ratio_over_transformers": {e: {str(b): self.ratio(b, e) for b in batches}
                                                   for e in self.engines if e != "transformers"},
                "token_check": asdict(self.check),
                "row0_tokens_same_at_every_batch": {e: self.row0_consistent(e) for e in self.engines}}


# ----------------------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[decode_cpu] {msg}", file=sys.stderr, flush=True)


@contextmanager
def timer() -> Iterator[list[float]]:
    out: list[float] = []
    t0 = time.perf_counter()
    yield out
    out.append(time.perf_counter() - t0)


def environment(threads: int) -> dict[str, Any]:
    import transformers
    return {**machine_environment(threads), "transformers": transformers.__version__}


# -------------------------------------------------------------------------------------- checkpoint

def shape_mismatches(model_dir: Path) -> list[str]:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    cfg.update(cfg.get("rope_parameters") or {})        # transformers >= 5 keeps rope_theta there
    return [f"{k}={cfg.get(k)!r} (want {v!r})" for k, v in MODEL_SHAPE.items() if cfg.get(k) != v]


def build_checkpoint(dest: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(SEED)
    config = LlamaConfig(**MODEL_SHAPE)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(dest, safe_serialization=True)


def ensure_checkpoint(model_dir: Path) -> Path:
    """Reuse model_dir when it holds a checkpoint of the right shape; else build it (atomically)."""
    if (model_dir / "config.json").exists():
        if bad := shape_mismatches(model_dir):
            raise SystemExit(f"{model_dir}: holds a checkpoint of another shape ({', '.join(bad)}); "
                             "delete it or pass another --model-dir")
        if not list(model_dir.glob("*.safetensors")):
            raise SystemExit(f"{model_dir}: has config.json but no *.safetensors; delete it or pass another --model-dir")
        log(f"reusing checkpoint {model_dir}")
        return model_dir
    if model_dir.exists() and any(model_dir.iterdir()):
        raise SystemExit(f"{model_dir}: exists, is not empty and holds no config.json; pass another --model-dir")
    log(f"building random SmolLM-135M-shaped checkpoint in {model_dir}")
    with atomic_directory(model_dir, overwrite=True) as tmp:       # replaces an empty model_dir (checked above)
        build_checkpoint(tmp)
    return model_dir


def make_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# -------------------------------------------------------------------------------------------- llmc

def llmc_runner(model, batch: int, prompt_len: int, gen_len: int):
    from llmc.runtime.runner import Runner, RuntimeConfig
    blocks = batch * math.ceil((prompt_len + gen_len) / BLOCK_SIZE) + 8
    cfg = RuntimeConfig(kernels="cpu", block_size=BLOCK_SIZE, max_num_seqs=batch,
                        max_batched_tokens=max(4096, batch * prompt_len), num_blocks=blocks)
    return Runner(model, cfg)


def llmc_once(runner, prompts: list[list[int]], gen_len: int) -> tuple[Sample, list[int]]:
    from llmc.runtime.sampler import SamplingParams
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    gc.collect()
    start = time.perf_counter()
    reqs = [runner.add(p, params) for p in prompts]
    t0 = time.perf_counter()
    first = runner.step()
    t1 = time.perf_counter()
    steps = 1
    while runner.has_work:
        runner.step()
        steps += 1
    t2 = time.perf_counter()
    if len(first) != len(prompts):
        raise RuntimeError(f"llmc: the first step sampled {len(first)} tokens, not {len(prompts)} "
                           "(prefills did not fit one step)")
    if steps != gen_len or any(len(r.output_ids) != gen_len for r in reqs):
        raise RuntimeError(f"llmc: {steps} steps / {[len(r.output_ids) for r in reqs]} tokens, want {gen_len}")
    sample = Sample(prefill_s=t1 - t0, decode_s=t2 - t1, total_s=t2 - start, batch=len(prompts), gen_len=gen_len,
                    loadavg_1m=os.getloadavg()[0])
    return sample, list(reqs[0].output_ids)


def bench_llmc(model, prompts: list[list[int]], gen_len: int, warmup: int, repeats: int,
               engine: str = "llmc") -> BenchResult:
    b = len(prompts)
    with timer() as setup:
        runner = llmc_runner(model, b, len(prompts[0]), gen_len)     # one Runner (and KV cache) per batch size
    samples, tokens = [], []
    for i in range(warmup + repeats):
        sample, tokens = llmc_once(runner, prompts, gen_len)
        kind = "warm-up" if i < warmup else f"run {i - warmup + 1}/{repeats}"
        log(f"{engine} B={b} {kind}: prefill {sample.prefill_s * 1e3:.0f} ms, decode {sample.decode_tok_s:.1f} tok/s")
        if i >= warmup:
            samples.append(sample)
    return BenchResult(engine, b, tuple(samples), tuple(tokens), setup[0], runner.backend.report())


# ------------------------------------------------------------------------------------ transformers

def load_hf(model_dir: Path):
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_generate(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def hf_once(model, input_ids: torch.Tensor, gen_len: int) -> tuple[Sample, list[int]]:
    gc.collect()
    with timer() as prefill:
        hf_generate(model, input_ids, 1)
    with timer() as total:
        out = hf_generate(model, input_ids, gen_len)
    new = out[:, input_ids.shape[1]:]
    if new.shape[1] != gen_len:
        raise RuntimeError(f"transformers generated {new.shape[1]} tokens, want {gen_len}")
    b = input_ids.shape[0]
    sample = Sample(prefill_s=prefill[0], decode_s=total[0] - prefill[0], total_s=total[0], batch=b, gen_len=gen_len,
                    loadavg_1m=os.getloadavg()[0])
    return sample, new[0].tolist()


def bench_hf(model, prompts: list[list[int]], gen_len: int, warmup: int, repeats: int) -> BenchResult:
    b, input_ids = len(prompts), torch.tensor(prompts, dtype=torch.long)
    samples, tokens = [], []
    for i in range(warmup + repeats):
        sample, tokens = hf_once(model, input_ids, gen_len)
        kind = "warm-up" if i < warmup else f"run {i - warmup + 1}/{repeats}"
        log(f"transformers B={b} {kind}: prefill {sample.prefill_s * 1e3:.0f} ms, "
            f"decode {sample.decode_tok_s:.1f} tok/s (est.)")
        if i >= warmup:
            samples.append(sample)
    return BenchResult("transformers", b, tuple(samples), tuple(tokens), 0.0)


# ----------------------------------------------------------------------------------------- compute

def compare_tokens(ours: list[int], theirs: list[int], n: int) -> TokenCheck:
    a, b = tuple(ours[:n]), tuple(theirs[:n])
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return TokenCheck(compared=min(len(a), len(b)), match=first is None and len(a) == len(b),
                      first_mismatch=first, llmc=a, transformers=b)


def check_batch1(llmc_model, hf_model, prompt: list[int], results: list[BenchResult], n: int) -> TokenCheck:
    """Batch-1 greedy tokens of both engines: from the timed runs if batch 1 was measured, else fresh."""
    got = {r.engine: list(r.row0_tokens) for r in results if r.batch == 1}
    if len(got) < 2:
        log(f"token check: generating {n} tokens at batch 1 with each engine")
        got["llmc"] = llmc_once(llmc_runner(llmc_model, 1, len(prompt), n), [prompt], n)[1]
        got["transformers"] = hf_once(hf_model, torch.tensor([prompt]), n)[1]
    return compare_tokens(got["llmc"], got["transformers"], n)


SCHEMES = ("w8a16", "w4a16")
SCHEME_GROUP = {"w4a16": 128}


def quantize_for_bench(model_dir: Path, scheme: str, work: Path):
    """The checkpoint quantized with `scheme` (RTN) under `work`, loaded."""
    from llmc.loader import load_model
    from llmc.quantizer import quantize_checkpoint
    from llmc.quantized.scheme import QuantRecipe, resolve_scheme
    out = work / f"{model_dir.name}-{scheme}"
    quantize_checkpoint(model_dir, out, QuantRecipe(scheme=resolve_scheme(scheme, SCHEME_GROUP.get(scheme))),
                        force=True)
    return load_model(out)


def run(args: argparse.Namespace, model_dir: Path) -> Report:
    from llmc.loader import load_model
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    if env["loadavg_start"][0] > 0.5:
        log(f"warning: the CPU is already busy (1-min load {env['loadavg_start'][0]:.1f}); with every core "
            "in use by torch threads, sharing it can slow both engines many times over")
    batches = sorted(set(args.batch))
    prompts = make_prompts(max(batches), args.prompt_len, MODEL_SHAPE["vocab_size"])
    log(f"batches {batches}, prompt {args.prompt_len}, gen {args.gen_len}, warm-up {args.warmup}, "
        f"repeats {args.repeats}, threads {torch.get_num_threads()}")

    with timer() as t_llmc:
        llmc_model = load_model(model_dir)
    with timer() as t_hf:
        hf_model = load_hf(model_dir)
    log(f"loaded: llmc {t_llmc[0]:.1f} s, transformers {t_hf[0]:.1f} s")

    quantized, quantize_s = {}, {}
    for scheme in args.scheme:
        with timer() as t_q:
            quantized[f"llmc {scheme}"] = quantize_for_bench(model_dir, scheme, Path(args.work_dir))
        quantize_s[scheme] = t_q[0]
        log(f"quantized to {scheme} (rtn) in {t_q[0]:.1f} s")

    results: list[BenchResult] = []
    for b in batches:
        results.append(bench_llmc(llmc_model, prompts[:b], args.gen_len, args.warmup, args.repeats))
        for engine, model in quantized.items():
            results.append(bench_llmc(model, prompts[:b], args.gen_len, args.warmup, args.repeats, engine))
        results.append(bench_hf(hf_model, prompts[:b], args.gen_len, args.warmup, args.repeats))
    check = check_batch1(llmc_model, hf_model, prompts[0], results, min(CHECK_TOKENS, args.gen_len))

    env["loadavg_end"] = list(os.getloadavg())
    config = {"model_shape": MODEL_SHAPE, "dtype": "float32", "init_seed": SEED, "prompt_seed": PROMPT_SEED,
              "model_dir": str(model_dir), "batches": batches, "prompt_len": args.prompt_len,
              "gen_len": args.gen_len, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
              "llmc": {"kernels": "cpu", "device": "cpu", "block_size": BLOCK_SIZE, "load_s": t_llmc[0]},
              "schemes": {s: {"algorithm": "rtn", "group_size": SCHEME_GROUP.get(s), "quantize_s": quantize_s[s]}
                          for s in args.scheme},
              "transformers": {"attn_implementation": "eager", "load_s": t_hf[0],
                               "decode_estimate": "B*(gen_len-1) / (generate time - generate(max_new_tokens=1) time)"}}
    return Report(env, config, tuple(results), check)


# ------------------------------------------------------------------------------------------ render

def fmt_stat(s: Stat, digits: int = 1) -> str:
    return f"{s.median:.{digits}f} ({s.lo:.{digits}f}–{s.hi:.{digits}f})"


def render(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table
    cfg, env = report.config, report.env
    load = max(s.loadavg_1m for r in report.results for s in r.samples)
    table = Table(title=f"Decode on CPU: SmolLM-135M shape (random init, fp32), prompt {cfg['prompt_len']}, "
                        f"gen {cfg['gen_len']}, greedy, {env['threads']} threads, {cfg['repeats']} timed runs",
                  caption=f"{env['cpu']}, {env['cpu_count']} CPUs, highest 1-min load {load:.1f}; torch {env['torch']}, "
                          f"transformers {env['transformers']}; transformers decode = B*(gen-1)/(generate - prefill)")
    table.add_column("engine")
    table.add_column("batch", justify="right")
    table.add_column("prefill ms", justify="right")
    table.add_column("decode tok/s median (min–max)", justify="right")
    table.add_column("e2e tok/s", justify="right")
    table.add_column("llmc/HF decode", justify="right")
    order = report.engines
    for r in sorted(report.results, key=lambda r: (r.batch, r.engine == "transformers", order.index(r.engine))):
        ratio = f"{report.ratio(r.batch, r.engine):.2f}×" if r.engine != "transformers" else ""
        table.add_row(r.engine, str(r.batch), f"{r.prefill_ms.median:.0f}", fmt_stat(r.decode_tok_s),
                      f"{r.e2e_tok_s.median:.1f}", ratio)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)            # a pipe or file: do not wrap the table at 80 columns
    console.print(table)
    c = report.check
    verdict = "match" if c.match else f"DIFFER from token {c.first_mismatch}"
    console.print(f"greedy tokens, batch 1, first {c.compared}: llmc vs transformers {verdict} "
                  f"({len(set(c.transformers))} distinct ids)")


# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="decode_cpu.py",
        description="Decode tokens/s of llmc vs Hugging Face transformers (eager fp32) on CPU, "
                    "SmolLM-135M-shaped random checkpoint.")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="checkpoint directory: reused if it holds one of the right shape, else built there "
                        "(default: a temporary directory, deleted at exit)")
    p.add_argument("--batch", type=int, action="append", default=None, metavar="B",
                   help="batch size to measure; repeat for several (default: 1 and 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length in (random) token ids (default: 128)")
    p.add_argument("--gen-len", type=int, default=None,
                   help=f"tokens generated per sequence (default: 128, or {QUICK_GEN_LEN} with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed runs per engine and batch size (default: 3, or {QUICK_REPEATS} with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both engines (default: 2)")
    p.add_argument("--scheme", action="append", default=[], choices=SCHEMES,
                   help="also measure llmc on the checkpoint quantized to this scheme (RTN); repeatable")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: --gen-len {QUICK_GEN_LEN} and --repeats {QUICK_REPEATS} unless given")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write environment, configuration and every sample to FILE (atomically; default: none)")
    args = p.parse_args(argv)
    args.batch = args.batch or [1, 8]
    if args.gen_len is None:
        args.gen_len = QUICK_GEN_LEN if args.quick else 128
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 3
    checks = {"--batch": min(args.batch) >= 1, "--prompt-len": args.prompt_len >= 1, "--gen-len": args.gen_len >= 2,
              "--repeats": args.repeats >= 1, "--warmup": args.warmup >= 0, "--threads": args.threads >= 1}
    for flag, ok in checks.items():
        if not ok:
            p.error(f"{flag} is out of range")
    if args.prompt_len + args.gen_len >= MODEL_SHAPE["max_position_embeddings"]:
        p.error(f"--prompt-len + --gen-len must stay below {MODEL_SHAPE['max_position_embeddings']}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="decode_cpu-") as tmp:
        args.work_dir = tmp                                   # quantized checkpoints go here
        model_dir = args.model_dir if args.model_dir is not None else Path(tmp) / "smollm135m-random"
        report = run(args, ensure_checkpoint(model_dir))
    render(report)
    if args.json is not None:
        write_json_atomic(args.json, report.to_json())
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
