"""Peak memory and time of `llmc quantize` (GPTQ w4a16 g128) on a TinyLlama-1.1B-shaped checkpoint.

What it measures
  A random-initialised Llama checkpoint shaped like TinyLlama-1.1B (22 layers, hidden 2048, 32 query /
  4 KV heads, MLP 5632, vocab 32000, untied lm_head, fp32, normal(0, 0.02) matrices and ones for the
  norms, seed 1234) is written as sharded safetensors (<= 500 MB shards + model.safetensors.index.json)
  with a small WordLevel tokenizer (<unk>=0, <s>=1, </s>=2, then 8000 synthetic words). It is built by a
  separate process, one shard at a time (so the builder holds at most one shard), under --model-dir and
  reused when that directory already holds the same checkpoint.

  A calibration text of random words from that vocabulary (seeded, long enough for --samples windows of
  --seqlen tokens) is generated, and a fresh child process (this script with an internal flag) runs

      quantize_checkpoint(model_dir, out_dir, QuantRecipe(w4a16 g128, "gptq", samples, seqlen), calib=...)

  The child reports its own ru_maxrss (QuantizeResult.peak_rss_bytes, taken at the end of
  quantize_checkpoint) and, after each layer, its current VmRSS / VmHWM / RssAnon / RssFile. The parent
  samples the child's /proc/<pid>/status every 0.5 s and takes the child's ru_maxrss from wait4(), so
  the peak is seen three ways. The peak covers the whole child process (Python, torch and llmc
  imports included), which is what a user running `llmc quantize` pays.

  Goal: peak RSS < 0.5 x the fp32 checkpoint's size on disk.

How to run
  .venv/bin/python benchmarks/quantize_memory.py [--json out.json]          # full run: 10-20 min, 2 cores
  .venv/bin/python benchmarks/quantize_memory.py --small                    # 4-layer smoke run

The table goes to stdout, progress to stderr; --json writes the environment, configuration, every layer
report, the per-layer timeline and the parent's RSS samples (atomically).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.bench.environment import environment as machine_environment, package_version
from llmc.io import atomic_directory, write_json_atomic as _write_json_atomic

SEED = 1234
TEXT_SEED = 4321
INIT_STD = 0.02
MAX_SHARD_BYTES = 500 * 10**6              # transformers' "500MB"
VOCAB_WORDS = 8000
SPECIALS = ("<unk>", "<s>", "</s>")        # ids 0, 1, 2
SAMPLE_PERIOD_S = 0.5
EVENT = "@@quantize_memory "               # prefix of the child's machine-readable stderr lines
STAMP_FILE = "llmc_bench_checkpoint.json"  # what built the checkpoint (for reuse)
MODEL_SHAPE: dict[str, Any] = dict(
    hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)
SMALL_LAYERS = 4
DEFAULT_MODEL_DIR = Path("/tmp/llmc-tinyllama-1.1b-random")
DEFAULT_OUT_DIR = Path("/tmp/llmc-tinyllama-1.1b-random-gptq-w4a16")
GiB = 1024**3


def log(msg: str) -> None:
    print(f"[quantize_memory] {msg}", file=sys.stderr, flush=True)


def shape_for(small: bool) -> dict[str, Any]:
    return {**MODEL_SHAPE, "num_hidden_layers": SMALL_LAYERS} if small else dict(MODEL_SHAPE)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process in bytes ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


# ------------------------------------------------------------------------------------- checkpoint

def tensor_plan(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in transformers' state_dict order."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    plan = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                 (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                 (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                 (p + "mlp.down_proj.weight", (h, f)),
                 (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return plan


def shard_plan(plan: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy packing as transformers does it: a new shard when the next tensor would overflow."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in plan:
        n = 4 * _numel(shp)
        if shards[-1] and size + n > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    return shards


def _numel(shp: tuple[int, ...]) -> int:
    n = 1
    for d in shp:
        n *= d
    return n


def vocabulary() -> list[str]:
    """VOCAB_WORDS distinct pronounceable lower-case words, always the same."""
    rng = random.Random(SEED)
    syl = [c + v for c in "bdfghjklmnprstvwz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < VOCAB_WORDS:
        words.add("".join(rng.choice(syl) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def stamp_for(shape: dict[str, Any]) -> dict[str, Any]:
    return {"shape": shape, "dtype": "float32", "seed": SEED, "init": f"normal(0, {INIT_STD}); norms = 1",
            "tokenizer": {"model": "WordLevel", "words": VOCAB_WORDS, "specials": list(SPECIALS),
                          "post_processor": "<s> $A"},
            "max_shard_bytes": MAX_SHARD_BYTES}


def write_tokenizer(dest: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({w: i + len(SPECIALS) for i, w in enumerate(vocabulary())})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")             # joins words with spaces
    tk.add_special_tokens(list(SPECIALS))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tk.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
    }, indent=2) + "\n")


def build_checkpoint(dest: Path, shape: dict[str, Any]) -> None:
    """Runs in its own process: one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    config.dtype = torch.float32                         # "dtype": "float32" in config.json
    config.save_pretrained(dest)
    write_tokenizer(dest)
    gen = torch.Generator().manual_seed(SEED)
    shards = shard_plan(tensor_plan(shape))
    weight_map, total = {}, 0
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            t = torch.ones(shp) if len(shp) == 1 else torch.empty(shp).normal_(0.0, INIT_STD, generator=gen)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(dest / fname), metadata={"format": "pt"})
        del tensors
        print(f"[quantize_memory] build: {fname} written ({len(shard)} tensors)", file=sys.stderr, flush=True)
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (dest / STAMP_FILE).write_text(json.dumps(stamp_for(shape), indent=2) + "\n")


def checkpoint_ok(model_dir: Path, shape: dict[str, Any]) -> str | None:
    """None when model_dir holds the checkpoint this script builds; else why not."""
    try:
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"no readable {STAMP_FILE} / index ({e.__class__.__name__})"
    if stamp != json.loads(json.dumps(stamp_for(shape))):
        return f"it was built with another configuration ({stamp.get('shape')})"
    missing = [f for f in sorted(set(index["weight_map"].values())) + ["config.json", "tokenizer.json",
               "tokenizer_config.json"] if not (model_dir / f).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    if set(index["weight_map"]) != {n for n, _ in tensor_plan(shape)}:
        return "its index names other tensors"
    return None


def ensure_checkpoint(model_dir: Path, shape: dict[str, Any]) -> float:
    """Reuse model_dir if it holds this checkpoint, else build it in a separate process (atomically).
    Returns the build time (0 when reused)."""
    if model_dir.exists() and any(model_dir.iterdir()):
        why = checkpoint_ok(model_dir, shape)
        if why is None:
            log(f"reusing checkpoint {model_dir}")
            return 0.0
        raise SystemExit(f"{model_dir}: not reusable ({why}); delete it or pass another --model-dir")
    log(f"building random {shape['num_hidden_layers']}-layer TinyLlama-shaped fp32 checkpoint in {model_dir} "
        "(separate process)")
    t0 = time.perf_counter()
    with atomic_directory(model_dir, overwrite=True) as tmp:       # replaces an empty model_dir (checked above)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_build", str(tmp),
                        json.dumps(shape)], check=True)
    return time.perf_counter() - t0


def write_calibration(path: Path, model_dir: Path, samples: int, seqlen: int) -> dict[str, Any]:
    """Random words of the vocabulary (Zipf-like frequencies): one token each, BOS is added by llmc,
    so samples * (seqlen - 1) words make the windows; 5 % more for safety."""
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    words = sorted((w for w in vocab if w not in SPECIALS), key=vocab.__getitem__)
    rng = random.Random(TEXT_SEED)
    weights = [1.0 / (r + 10) for r in range(len(words))]
    n = int(samples * (seqlen - 1) * 1.05) + 64
    picked = rng.choices(words, weights=weights, k=n)
    lines = [" ".join(picked[i:i + 16]) for i in range(0, n, 16)]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return {"file": str(path), "words": n, "seed": TEXT_SEED,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


# ----------------------------------------------------------------------------------- child process

def child_main(spec_path: Path) -> int:
    """Quantize in this (fresh) process; per-layer events on stderr, the result as JSON to a file."""
    t_start = time.monotonic()
    spec = json.loads(spec_path.read_text())

    def event(kind: str, **kw: Any) -> None:
        st = proc_status()
        print(EVENT + json.dumps({"event": kind, "t": time.monotonic(), **st, **kw}), file=sys.stderr, flush=True)

    import torch
    from dataclasses import asdict
    from llmc.quantizer import quantize_checkpoint
    from llmc.quantized.scheme import QuantRecipe, resolve_scheme
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    event("imported", start=t_start, torch_threads=torch.get_num_threads(),
          ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def on_layer(report, total: int) -> None:
        event("layer", layer=report.layer, total=total, seconds=report.seconds,
              output_sqnr_db=report.output_sqnr_db, sqnr_db_mean=report.sqnr_db_mean)

    recipe = QuantRecipe(scheme=resolve_scheme("w4a16", group_size=spec["group_size"]), algorithm="gptq",
                         calib_samples=spec["samples"], calib_seqlen=spec["seqlen"])
    result = quantize_checkpoint(spec["model_dir"], spec["out_dir"], recipe, force=True, calib=spec["calib"],
                                 on_layer=on_layer)
    event("done")
    data = asdict(result)
    data["torch_threads"] = torch.get_num_threads()
    data["final_status"] = proc_status()
    Path(spec["result"]).write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 0


@dataclass
class ChildRun:
    returncode: int = -1
    wall_s: float = 0.0
    wait4_maxrss: int = 0                                   # ru_maxrss of the child from wait4()
    samples: list[dict[str, Any]] = field(default_factory=list)   # parent's /proc samples
    events: list[dict[str, Any]] = field(default_factory=list)    # the child's stderr events
    result: dict[str, Any] | None = None


def run_child(spec: dict[str, Any]) -> ChildRun:
    run = ChildRun()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", spec["spec_file"]],
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            st = proc_status(proc.pid)
            if "VmRSS" in st:
                run.samples.append({"t": time.monotonic() - t0, **st})
            done.wait(SAMPLE_PERIOD_S)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(EVENT):
                ev = json.loads(line[len(EVENT):])
                ev["t"] -= t0
                run.events.append(ev)
                if ev["event"] == "layer":
                    sq = ev.get("output_sqnr_db")
                    log(f"layer {ev['layer']:>5}/{ev['total'] - 1}: {ev['seconds']:6.1f} s, t={ev['t']:7.1f} s, "
                        f"RSS {gb(ev.get('VmRSS'))} (anon {gb(ev.get('RssAnon'))}, file {gb(ev.get('RssFile'))}), "
                        f"HWM {gb(ev.get('VmHWM'))}" + (f", out SQNR {sq:.1f} dB" if sq is not None else ""))
                elif ev["event"] == "imported":
                    log(f"child {proc.pid}: imports done at t={ev['t']:.1f} s, RSS {gb(ev.get('VmRSS'))}, "
                        f"{ev['torch_threads']} torch threads")
            else:
                sys.stderr.write("  child| " + line)
                sys.stderr.flush()

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for th in threads:
        th.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    run.wall_s = time.monotonic() - t0
    proc.returncode = run.returncode = os.waitstatus_to_exitcode(status)
    run.wait4_maxrss = usage.ru_maxrss * 1024
    done.set()
    for th in threads:
        th.join(timeout=10)
    if run.returncode == 0:
        run.result = json.loads(Path(spec["result"]).read_text())
    return run


# ------------------------------------------------------------------------------------------ report

def environment(threads: int | None) -> dict[str, Any]:
    """threads: what --threads asked for (None: torch's default)."""
    mem = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, rest = line.partition(":")
        if k in ("MemTotal", "MemAvailable"):
            mem[k] = int(rest.split()[0]) * 1024
    return {**machine_environment(threads), "safetensors": package_version("safetensors"),
            "mem_total": mem.get("MemTotal"), "mem_available_start": mem.get("MemAvailable")}


def summarize(run: ChildRun, fp32_bytes: int) -> dict[str, Any]:
    r = run.result or {}
    layers = [x for x in r.get("layers", []) if x["layer"] != "other"]
    other = next((x for x in r.get("layers", []) if x["layer"] == "other"), None)
    secs = [x["seconds"] for x in layers]
    sqnr = [x["output_sqnr_db"] for x in layers if x.get("output_sqnr_db") is not None]
    wsq = [x["sqnr_db_mean"] for x in layers if x.get("sqnr_db_mean") is not None]
    sampled_hwm = max((s.get("VmHWM", 0) for s in run.samples), default=0)
    sampled_rss = max((s.get("VmRSS", 0) for s in run.samples), default=0)
    at_peak = max(run.samples, key=lambda s: s.get("VmRSS", 0), default={})
    imported = next((e for e in run.events if e["event"] == "imported"), {})
    peak = max(r.get("peak_rss_bytes", 0), sampled_hwm, run.wait4_maxrss)
    return {
        "fp32_bytes": fp32_bytes, "quantized_bytes": r.get("bytes_out"), "bytes_in_reported": r.get("bytes_in"),
        "peak_rss_bytes": peak,
        "peak_ru_maxrss_child": r.get("peak_rss_bytes"), "peak_ru_maxrss_wait4": run.wait4_maxrss,
        "peak_vmhwm_sampled": sampled_hwm, "peak_vmrss_sampled": sampled_rss,
        "rss_anon_at_peak_sample": at_peak.get("RssAnon"), "rss_file_at_peak_sample": at_peak.get("RssFile"),
        "peak_rss_anon_sampled": max((s.get("RssAnon", 0) for s in run.samples), default=0),
        "peak_rss_file_sampled": max((s.get("RssFile", 0) for s in run.samples), default=0),
        "rss_after_imports": imported.get("VmRSS"),
        "ratio_peak_over_fp32": peak / fp32_bytes if fp32_bytes else None,
        "goal": "peak RSS < 0.5 x fp32 checkpoint size on disk",
        "goal_met": bool(r) and peak < 0.5 * fp32_bytes,
        "quantize_seconds": r.get("seconds"), "child_wall_seconds": run.wall_s,
        "layer_seconds_mean": sum(secs) / len(secs) if secs else None,
        "layer_seconds_min": min(secs, default=None), "layer_seconds_max": max(secs, default=None),
        "other_group_seconds": other["seconds"] if other else None,
        "output_sqnr_db_mean": sum(sqnr) / len(sqnr) if sqnr else None,
        "output_sqnr_db_min": min(sqnr, default=None),
        "weight_sqnr_db_mean": sum(wsq) / len(wsq) if wsq else None,
        "torch_threads": r.get("torch_threads", imported.get("torch_threads")),
    }


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    s, env, cfg = report["summary"], report["env"], report["config"]
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    t = Table(title=f"llmc quantize GPTQ w4a16 g{cfg['group_size']}: TinyLlama-1.1B shape, "
                    f"{cfg['shape']['num_hidden_layers']} layers, random fp32, calibration "
                    f"{cfg['samples']}x{cfg['seqlen']} tokens",
              caption=f"{env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']}, {s['torch_threads']} torch "
                      f"threads, 1-min load {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("note")
    t.add_row("fp32 checkpoint on disk", gb(s["fp32_bytes"]), f"{s['fp32_bytes']:,} B")
    if s["quantized_bytes"]:
        t.add_row("quantized checkpoint on disk", gb(s["quantized_bytes"]),
                  f"{s['fp32_bytes'] / s['quantized_bytes']:.2f}x smaller")
    t.add_row("peak RSS (max of all)", gb(s["peak_rss_bytes"]), f"{s['peak_rss_bytes'] / GiB:.2f} GiB")
    t.add_row("  ru_maxrss (child, in quantize_checkpoint)", gb(s["peak_ru_maxrss_child"]), "")
    t.add_row("  ru_maxrss (wait4)", gb(s["peak_ru_maxrss_wait4"]), "whole child process")
    t.add_row("  VmHWM (sampled every 0.5 s)", gb(s["peak_vmhwm_sampled"]),
              f"max sampled VmRSS {gb(s['peak_vmrss_sampled'])}")
    t.add_row("  at the peak sample: RssAnon / RssFile",
              f"{gb(s['rss_anon_at_peak_sample'])} / {gb(s['rss_file_at_peak_sample'])}",
              f"max RssAnon {gb(s['peak_rss_anon_sampled'])}, max RssFile {gb(s['peak_rss_file_sampled'])}")
    t.add_row("  RSS after imports", gb(s["rss_after_imports"]), "python + torch + llmc")
    ratio = s["ratio_peak_over_fp32"]
    t.add_row("peak / fp32 size", "-" if ratio is None else f"{ratio:.3f}", "goal: < 0.5")
    t.add_row("goal met", "[green]yes[/green]" if s["goal_met"] else "[red]NO[/red]",
              f"limit {gb(0.5 * s['fp32_bytes'])}")
    if s["quantize_seconds"] is not None:
        t.add_row("time, quantize_checkpoint", f"{s['quantize_seconds']:.1f} s",
                  f"child wall {s['child_wall_seconds']:.1f} s (imports included)")
        t.add_row("time per decoder layer", f"{s['layer_seconds_mean']:.1f} s",
                  f"min {s['layer_seconds_min']:.1f}, max {s['layer_seconds_max']:.1f}; "
                  f"lm_head/embed/norm {s['other_group_seconds']:.1f} s")
        t.add_row("output SQNR, mean over layers", f"{s['output_sqnr_db_mean']:.2f} dB",
                  f"worst layer {s['output_sqnr_db_min']:.2f} dB; weight SQNR mean {s['weight_sqnr_db_mean']:.2f} dB")
    t.add_row("torch threads", str(s["torch_threads"]), "")
    console.print(t)

    tl = Table(title="Timeline (child, after each layer group)")
    for c in ("layer", "t s", "layer s", "VmRSS", "RssAnon", "RssFile", "VmHWM", "out SQNR dB"):
        tl.add_column(c, justify="right")
    for ev in report["timeline"]:
        sq = ev.get("output_sqnr_db")
        tl.add_row(str(ev["layer"]), f"{ev['t']:.1f}", f"{ev['seconds']:.1f}", gb(ev.get("VmRSS")),
                   gb(ev.get("RssAnon")), gb(ev.get("RssFile")), gb(ev.get("VmHWM")),
                   "-" if sq is None else f"{sq:.2f}")
    console.print(tl)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """llmc's atomic JSON writer, after turning paths and other objects into strings."""
    _write_json_atomic(path, json.loads(json.dumps(data, default=str)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quantize_memory.py",
                                description="Peak RSS and time of llmc GPTQ w4a16 quantization of a "
                                            "TinyLlama-1.1B-shaped random fp32 checkpoint.")
    p.add_argument("--model-dir", type=Path, default=None,
                   help=f"checkpoint directory, reused if it holds this checkpoint, else built there "
                        f"(default: {DEFAULT_MODEL_DIR}, or ...-{SMALL_LAYERS}l with --small)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"quantized output, replaced if present (default: {DEFAULT_OUT_DIR}, or ...-{SMALL_LAYERS}l)")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default: 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration tokens per sample (default: 512)")
    p.add_argument("--group-size", type=int, default=128, help="w4a16 group size (default: 128)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in the quantizing process (default: torch's own choice)")
    p.add_argument("--small", action="store_true",
                   help=f"smoke run: a {SMALL_LAYERS}-layer model of the same width")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report to FILE (atomically)")
    args = p.parse_args(argv)
    if args.samples < 1 or args.seqlen < 2 or args.seqlen > MODEL_SHAPE["max_position_embeddings"]:
        p.error("need --samples >= 1 and 2 <= --seqlen <= 2048")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.group_size < 1 or MODEL_SHAPE["hidden_size"] % args.group_size or \
            MODEL_SHAPE["intermediate_size"] % args.group_size:
        p.error("--group-size must divide 2048 and 5632")
    suffix = f"-{SMALL_LAYERS}l" if args.small else ""
    args.model_dir = args.model_dir or DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + suffix)
    args.out_dir = args.out_dir or DEFAULT_OUT_DIR.with_name(DEFAULT_OUT_DIR.name + suffix)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = shape_for(args.small)
    env = environment(args.threads)
    if env["loadavg_start"][0] > 1.2:
        log(f"warning: the machine is busy (1-min load {env['loadavg_start'][0]:.2f}); times will be inflated")
    build_s = ensure_checkpoint(args.model_dir, shape)
    index = json.loads((args.model_dir / "model.safetensors.index.json").read_text())
    fp32_bytes = sum((args.model_dir / f).stat().st_size for f in set(index["weight_map"].values()))
    with tempfile.TemporaryDirectory(prefix="llmc-quantize-memory-") as tmp:
        calib = write_calibration(Path(tmp) / "calibration.txt", args.model_dir, args.samples, args.seqlen)
        spec = {"model_dir": str(args.model_dir), "out_dir": str(args.out_dir), "calib": calib["file"],
                "samples": args.samples, "seqlen": args.seqlen, "group_size": args.group_size,
                "threads": args.threads, "result": str(Path(tmp) / "result.json"), "spec_file": str(Path(tmp) / "spec.json")}
        Path(spec["spec_file"]).write_text(json.dumps(spec))
        log(f"quantizing in a child process: GPTQ w4a16 g{args.group_size}, {args.samples}x{args.seqlen} "
            f"calibration tokens, {gb(fp32_bytes)} fp32 in -> {args.out_dir}")
        run = run_child(spec)
    env["loadavg_end"] = list(os.getloadavg())
    if run.returncode != 0:
        log(f"the quantization child failed (exit {run.returncode}); peak RSS so far "
            f"{gb(max(run.wait4_maxrss, max((s.get('VmHWM', 0) for s in run.samples), default=0)))}")
    summary = summarize(run, fp32_bytes)
    timeline = [{k: ev.get(k) for k in ("layer", "t", "seconds", "VmRSS", "VmHWM", "RssAnon", "RssFile",
                                        "output_sqnr_db", "sqnr_db_mean")}
                for ev in run.events if ev["event"] == "layer"]
    config = {"shape": shape, "small": args.small, "dtype": "float32", "init_seed": SEED, "init_std": INIT_STD,
              "model_dir": str(args.model_dir), "out_dir": str(args.out_dir), "scheme": "w4a16",
              "algorithm": "gptq", "group_size": args.group_size, "samples": args.samples, "seqlen": args.seqlen,
              "threads_requested": args.threads,
              "calibration_text": {k: v for k, v in calib.items() if k != "file"}, "build_seconds": build_s,
              "sample_period_s": SAMPLE_PERIOD_S}
    report = {"env": env, "config": config, "summary": summary, "timeline": timeline,
              "events": run.events, "rss_samples": run.samples,
              "result": run.result, "child_returncode": run.returncode}
    if args.json:
        write_json_atomic(args.json, report)
        log(f"wrote {args.json}")
    render(report)
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--_child":
        sys.exit(child_main(Path(sys.argv[2])))
    if len(sys.argv) >= 2 and sys.argv[1] == "--_build":
        build_checkpoint(Path(sys.argv[2]), json.loads(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
