"""`bench throughput`: offline prefill and decode speed of a model over a sweep of batch sizes.

Protocol, per batch size B: one Runner (max_num_seqs=B, max_batched_tokens=B*input_len so the whole
batch prefills in one step, a KV cache of exactly the blocks the batch needs) runs `warmup` untimed
and then `repeat` timed generations. Each generation submits B prompts of `input_len` random token
ids (uniform over [3, vocab) minus the tokenizer's BOS/EOS ids, from a fixed seed; batch B uses the
first B of the same prompts) and generates exactly `output_len` tokens each, greedy, EOS ignored.

Per timed run (a Sample): the prefill is the steps until every request has its first token, the
decode the steps after them. prefill tok/s = B*input_len / prefill seconds; decode tok/s =
B*(output_len-1) / decode seconds (none when output_len is 1); end-to-end tok/s = generated tokens /
(submission to the last token); TTFT = the mean over the batch of submission to each request's first
token. The tokens are counted as the Runner emits them, and a run that generated other than
B*output_len is a bug. Results give the median, min and max over the timed runs and keep every raw
sample, so each number can be recomputed.

With --against (another model, or this one on the reference kernels), a second Runner runs the same
prompts beside ours: both warm up, then the timed runs alternate (ours then theirs, theirs then
ours, ...). Each pair gives ratios (our prefill, decode, end-to-end tok/s over theirs), and the
result reports their medians: a machine that is 30% slower today slows both sides of a pair alike,
so a gate on the ratio holds where a gate on tok/s would fail.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llmc.allocator import peak_rss_bytes
from llmc.bench.prompt_ids import prompt_ids
from llmc.bench.result import BenchResult, model_identity, sampled
from llmc.errors import OptionError

PROMPT_SEED = 4321
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Sample:
    """One generation of a batch: raw times and counts, and the rates derived from them."""
    batch: int
    input_len: int
    output_len: int
    generated_tokens: int          # counted from the Runner's token events
    prefill_steps: int
    decode_steps: int
    prefill_s: float               # first step until every request has its first token
    decode_s: float                # the steps after that
    total_s: float                 # submission of the batch until its last token
    ttft_s: float                  # mean over the batch: submission until the request's first token
    loadavg_1m: float              # right after the run: above the thread count means a shared CPU
    decode_op_s: dict[str, float] | None = None   # seconds per op kind inside the decode steps (native)

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.input_len / self.prefill_s

    @property
    def decode_tok_s(self) -> float | None:
        """None when nothing was decoded (output_len 1)."""
        return self.batch * (self.output_len - 1) / self.decode_s if self.decode_steps else None

    def decode_profile(self) -> dict[str, float] | None:
        """Where one decode step's time goes, in ms: each op kind of the native step, and `outside`
        (scheduling, sampling, packing the batch: the rest of the step's wall time)."""
        if self.decode_op_s is None or not self.decode_steps:
            return None
        per_step = {op: 1e3 * t / self.decode_steps for op, t in sorted(self.decode_op_s.items(), key=lambda kv: -kv[1])}
        return {**per_step, "outside": 1e3 * self.decode_s / self.decode_steps - sum(per_step.values())}

    @property
    def e2e_tok_s(self) -> float:
        return self.generated_tokens / self.total_s

    @property
    def ttft_ms(self) -> float:
        return self.ttft_s * 1e3

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **{name: getattr(self, name) for name in METRICS}}


METRICS = {  # per-sample rate -> (unit, which way is better)
    "prefill_tok_s": ("tok/s", "higher"),
    "decode_tok_s": ("tok/s", "higher"),
    "e2e_tok_s": ("tok/s", "higher"),
    "ttft_ms": ("ms", "lower"),
}


def metric(values: list[float | None], unit: str, direction: str) -> dict[str, Any] | None:
    """Median and spread of one rate over the timed runs, with what a comparison needs; None when a
    run has no value (decode of a single output token)."""
    if any(v is None for v in values):
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "unit": unit,
            "direction": direction}


@dataclass(frozen=True)
class BatchResult:
    batch: int
    samples: list[Sample]          # the timed runs
    runtime: dict[str, Any]        # the RuntimeConfig of this batch size's Runner
    backend: dict[str, Any]        # its backend's report(): per op, the variant counts, warm-up included
    against: list[Sample] | None = None   # the timed runs of the --against model, interleaved with ours

    def stat(self, name: str) -> dict[str, Any] | None:
        return metric([getattr(s, name) for s in self.samples], *METRICS[name])

    def ratios(self) -> list[dict[str, Any]]:
        """Per timed run: our rate over the --against model's in the run beside it."""
        out = []
        for ours, theirs in zip(self.samples, self.against or []):
            rec = {}
            for name in RATIO_METRICS:
                a, b = getattr(ours, name), getattr(theirs, name)
                rec[f"{name}_ratio"] = a / b if a is not None and b else None
            out.append(rec)
        return out

    def decode_profile(self) -> dict[str, float] | None:
        """The decode step's profile of the run with the median decode speed (Sample.decode_profile)."""
        ranked = sorted((s for s in self.samples if s.decode_tok_s is not None), key=lambda s: s.decode_tok_s)
        return ranked[len(ranked) // 2].decode_profile() if ranked else None


RATIO_METRICS = ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")    # gated as ratios against a same-run reference


@dataclass(frozen=True)
class ThroughputResult:
    model: dict[str, Any]          # path, sha256, recipe, kind, architecture, parameters, quantization, ...
    config: dict[str, Any]         # every option, and how the prompts were made
    env: dict[str, Any]            # versions, CPU, threads, load at the start and the end
    results: list[BatchResult]
    peak_rss_bytes: int
    backend: dict[str, Any]        # what ran (target, device, kernel set), without the per-op counts

    def to_result(self) -> BenchResult:
        """The result in the bench schema (llmc.bench.result): per batch size B, the medians over the
        timed runs as `NAME@batchB`, and with --against the medians of the per-run ratios."""
        samples: dict[str, list[dict]] = {}
        metrics = {}
        for b in self.results:
            group = f"batch{b.batch}"
            samples[group] = [s.to_json() for s in b.samples]
            for name, (unit, direction) in METRICS.items():
                if b.stat(name) is not None:
                    metrics[f"{name}@{group}"] = sampled("median", group, name, samples, unit, direction)
            if b.against is not None:
                samples[f"against-{group}"] = [s.to_json() for s in b.against]
                samples[f"ratio-{group}"] = b.ratios()
                for name in RATIO_METRICS:
                    if all(r[f"{name}_ratio"] is not None for r in samples[f"ratio-{group}"]):
                        metrics[f"{name}_ratio@{group}"] = sampled("median", f"ratio-{group}", f"{name}_ratio",
                                                                  samples, "x", "higher")
        details = {"peak_rss_bytes": self.peak_rss_bytes, "backend": self.backend,
                   "batches": [{"batch": b.batch, "decode_profile_ms": b.decode_profile(), "runtime": b.runtime,
                                "backend": b.backend} for b in self.results]}
        return BenchResult(kind="throughput", model=self.model, env=self.env, config=self.config, metrics=metrics,
                           samples=samples, details=details)

    def to_json(self) -> dict[str, Any]:
        """The result file's content (llmc.io.stamp_json adds the producer)."""
        return self.to_result().to_json()


def batch_summaries(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch size of a throughput result (the file's JSON): each rate's median, min and max over
    the timed runs (`metric`), and the decode profile; for scripts that tabulate results."""
    profiles = {d["batch"]: d["decode_profile_ms"] for d in result["details"]["batches"]}
    out = []
    for b in result["config"]["batches"]:
        runs = result["samples"][f"batch{b}"]
        out.append({"batch": b, **{name: metric([r[name] for r in runs], *METRICS[name]) for name in METRICS},
                    "decode_profile_ms": profiles.get(b)})
    return out


OnRun = Callable[[int, str, Sample], None]       # (batch, "warm-up 1/1" | "run 2/3", sample)


def parse_batches(text: str) -> tuple[int, ...]:
    """`--batch 1,8,32` -> (1, 8, 32)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise OptionError("batch", f"expected comma-separated batch sizes such as 1,8,32, got {text!r}") from None


def check_options(batches, input_len: int, output_len: int, repeat: int, warmup: int,
                  threads: int | None) -> tuple[int, ...]:
    """Every option in range before any work; returns the batch sizes, sorted and distinct."""
    if not isinstance(batches, (list, tuple)) or not batches:
        raise OptionError("batch", f"give at least one batch size, got {batches!r}")
    bad = [b for b in batches if not isinstance(b, int) or isinstance(b, bool) or b < 1]
    if bad:
        raise OptionError("batch", f"batch sizes must be integers of at least 1, got {', '.join(map(repr, bad))}")
    for name, value, least in (("input_len", input_len, 1), ("output_len", output_len, 1),
                               ("repeat", repeat, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if value is not None and value < least:
            raise OptionError(name, f"must be at least {least}, got {value}")
    return tuple(sorted(set(batches)))


def check_context(input_len: int, output_len: int, context: int) -> None:
    if input_len + output_len > context:
        raise OptionError("output_len", f"a prompt of {input_len} tokens and {output_len} generated make "
                          f"{input_len + output_len}, more than the model's context ({context})",
                          hint="shorten the prompt or the output")


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_prompts(count: int, length: int, allowed: list[int]) -> list[list[int]]:
    """`count` prompts of `length` ids, uniform over `allowed` (llmc.bench.prompt_ids), seeded."""
    pool = torch.tensor(allowed)
    picks = torch.randint(0, len(pool), (count, length), generator=torch.Generator().manual_seed(PROMPT_SEED))
    return pool[picks].tolist()


def runtime_for(batch: int, input_len: int, output_len: int, kernels: str | None):
    """A Runner config where the batch prefills in one step and the KV cache holds the whole batch,
    no more: B * ceil((input_len + output_len) / BLOCK_SIZE) blocks. No prefix caching: the timed
    runs repeat the warm-up's prompts, whose prefill must be measured each time."""
    from llmc.runtime.runner import RuntimeConfig

    return RuntimeConfig(kernels=kernels, block_size=BLOCK_SIZE, max_num_seqs=batch,
                         max_batched_tokens=batch * input_len, prefix_caching=False,   # repeats reuse prompts
                         num_blocks=batch * -(-(input_len + output_len) // BLOCK_SIZE))


def run_once(runner, prompts: list[list[int]], output_len: int) -> Sample:
    """One generation of the batch through `runner`, timed (see the module docstring)."""
    from llmc.runtime.sampler import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    gc.collect()
    submitted = time.perf_counter()
    reqs = [runner.add(p, params) for p in prompts]
    first: dict[str, float] = {}
    generated = prefill_steps = decode_steps = 0
    start = now = time.perf_counter()
    while len(first) < len(reqs) and runner.has_work:
        events = runner.step()
        now = time.perf_counter()
        for e in events:
            first.setdefault(e.request_id, now)
        generated += len(events)
        prefill_steps += 1
    prefilled = now
    profiled = hasattr(runner.backend, "reset_profile")
    if profiled:
        runner.backend.reset_profile()
    while runner.has_work:
        generated += len(runner.step())
        decode_steps += 1
    end = time.perf_counter()
    op_s = runner.backend.report()["profile"]["op_seconds"] if profiled else None
    if generated != len(prompts) * output_len:
        raise RuntimeError(f"the batch generated {generated} tokens, not {len(prompts)} x {output_len}")
    return Sample(batch=len(prompts), input_len=len(prompts[0]), output_len=output_len, generated_tokens=generated,
                  prefill_steps=prefill_steps, decode_steps=decode_steps, prefill_s=prefilled - start,
                  decode_s=end - prefilled, total_s=end - submitted,
                  ttft_s=statistics.fmean(t - submitted for t in first.values()), loadavg_1m=os.getloadavg()[0],
                  decode_op_s=op_s)


def bench_batch(model, prompts: list[list[int]], output_len: int, repeat: int, warmup: int, kernels: str | None,
                on_run: OnRun | None, against: tuple[Any, str | None] | None = None) -> BatchResult:
    """Warm-up and timed runs of one batch size through one Runner. With `against` (a model and its
    kernel set), a second Runner runs the same prompts beside ours: warm-ups, then each timed run of
    ours next to one of theirs, in alternating order (ours first, then theirs first), so a machine
    that slows down during the run slows both alike."""
    from llmc.runtime.runner import Runner

    batch = len(prompts)
    runtime = runtime_for(batch, len(prompts[0]), output_len, kernels)
    runner = Runner(model, runtime)
    other = Runner(against[0], runtime_for(batch, len(prompts[0]), output_len, against[1])) if against else None
    samples, theirs = [], []
    for i in range(warmup + repeat):
        timed = i >= warmup
        label = f"warm-up {i + 1}/{warmup}" if not timed else f"run {i - warmup + 1}/{repeat}"
        order = [(runner, samples, "")] + ([(other, theirs, " (against)")] if other else [])
        if other and timed and (i - warmup) % 2:
            order.reverse()
        for r, kept, suffix in order:
            sample = run_once(r, prompts, output_len)
            if timed:
                kept.append(sample)
            if on_run is not None:
                on_run(batch, label + suffix, sample)
    return BatchResult(batch=batch, samples=samples, runtime=asdict(runtime), backend=runner.backend.report(),
                       against=theirs if other else None)


def describe_model(path: Path | str, model) -> dict[str, Any]:
    """What the result says about the model (loaded from `path`): its identity (llmc.bench.result)
    and what llmc.inspection.inspect reports."""
    from llmc.inspection import inspect

    r = inspect(path, model=model)
    keys = ("kind", "target", "architecture", "parameters", "layers", "hidden_size", "vocab_size",
            "max_position_embeddings", "dtype", "compute_dtype", "kv_cache_dtype", "bytes_on_disk", "quantization")
    return {**model_identity(path), **{k: getattr(r, k) for k in keys}}


AGAINST_REFERENCE_KERNELS = "reference-kernels"


def load_against(against: Path | str | None, path: Path | str, model, kernels: str | None):
    """(model, kernel set, what the result records) of --against: the same model on the reference
    kernels, or another model on the same kernel set; None without --against."""
    from llmc.loader import load_model

    if against is None:
        return None, None
    if str(against) == AGAINST_REFERENCE_KERNELS:
        if kernels == "reference":
            raise OptionError("against", "the model already runs the reference kernels (--kernels reference)")
        return (model, "reference"), {"against": AGAINST_REFERENCE_KERNELS, "model": model_identity(path)}
    other = load_model(against)
    if other.arch.vocab_size != model.arch.vocab_size:
        raise OptionError("against", f"{against} has a vocabulary of {other.arch.vocab_size}, the model "
                          f"{model.arch.vocab_size}: the same prompts cannot run on both")
    return (other, kernels), {"against": str(against), "model": describe_model(against, other)}


def throughput(path: Path | str, batches=(1,), input_len: int = 128, output_len: int = 128, repeat: int = 3,
               warmup: int = 1, threads: int | None = None, kernels: str | None = None,
               on_run: OnRun | None = None, against: Path | str | None = None) -> ThroughputResult:
    """Measure prefill, decode and end-to-end speed and time to first token of the model at `path`
    (checkpoint, quantized checkpoint or engine) at each batch size (the protocol in the module
    docstring), with torch running `threads` threads (default: the cores this process may use; the
    previous count is restored after) and the kernel set `kernels` (None: the target's default).
    `against`: also measure, interleaved run by run, another model (a path) or this model on the
    reference kernels ("reference-kernels"), and report our speed as a ratio of theirs (a ratio
    survives a machine that is slower today). `on_run(batch, label, sample)` is called after every
    run, warm-up included."""
    from llmc.bench.environment import environment
    from llmc.loader import load_model

    batches = check_options(batches, input_len, output_len, repeat, warmup, threads)
    threads = threads or default_threads()
    model = load_model(path)
    check_context(input_len, output_len, model.arch.max_position_embeddings)
    pair, against_info = load_against(against, path, model, kernels)
    if pair is not None:
        check_context(input_len, output_len, pair[0].arch.max_position_embeddings)
    model_info = describe_model(path, model)
    allowed, drawn_from = prompt_ids(model.arch.vocab_size, model.tokenizer.info)
    prompts = make_prompts(max(batches), input_len, allowed)
    config = {"batches": list(batches), "input_len": input_len, "output_len": output_len, "repeat": repeat,
              "warmup": warmup, "threads": threads, "kernels": kernels, "block_size": BLOCK_SIZE,
              "sampling": "greedy, EOS ignored", "prompt_seed": PROMPT_SEED,
              "prompt_ids": f"{drawn_from}; batch B uses the first B prompts",
              "against": None if against is None else str(against),
              "against_kind": None if against is None else
              "reference-kernels" if str(against) == AGAINST_REFERENCE_KERNELS else "model",
              "against_model": None if against_info is None else against_info["model"]}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        env = environment(threads=torch.get_num_threads())
        results = [bench_batch(model, prompts[:b], output_len, repeat, warmup, kernels, on_run, pair)
                   for b in batches]
        env["loadavg_end"] = list(os.getloadavg())
    finally:
        torch.set_num_threads(previous)
    backend = {k: v for k, v in results[0].backend.items() if k != "ops"}     # per-op counts: per batch size
    return ThroughputResult(model=model_info, config=config, env=env, results=results,
                            peak_rss_bytes=peak_rss_bytes(), backend=backend)
