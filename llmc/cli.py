"""The `llmc` command line: thin wrappers over the library functions of the same names.

Results go to stdout (a rich table, or JSON with --json); progress and logs go to stderr. A user
error prints one line and exits 2; --debug shows the traceback instead.
"""
from __future__ import annotations

import json
import sys
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Column, Table

from llmc import __version__
from llmc.errors import ConfigError, LlmcError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="llmc: turn a Hugging Face causal LM into a fast engine and run it. "
                       "Add --debug to any command for a traceback on error.")
out, err = Console(), Console(stderr=True)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A Hugging Face checkpoint directory or an llmc engine directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Architecture, sizes and KV-cache cost of a checkpoint or engine."""
    from llmc.inspection import inspect

    r = inspect(path)
    if as_json:
        _print_json(asdict(r))
        return
    t = Table(Column("field"), Column("value", justify="right"), title=f"llmc inspect · {path}")
    rows = [
        ("kind", "engine" + (f" ({r.target})" if r.target else "") if r.kind == "engine" else "Hugging Face checkpoint"),
        ("architecture", r.architecture), ("layers", str(r.layers)), ("hidden size", str(r.hidden_size)),
        ("intermediate size", str(r.intermediate_size)), ("heads / kv heads", f"{r.heads} / {r.kv_heads}"),
        ("head dim", str(r.head_dim)), ("vocab", f"{r.vocab_size:,}"),
        ("context (max positions)", f"{r.max_position_embeddings:,}"),
        ("rope", f"{r.rope['rope_type']}, theta {r.rope['theta']:g}"),
        ("tied embeddings", "yes" if r.tie_word_embeddings else "no"),
        ("sliding window", str(r.sliding_window) if r.sliding_window else "none"),
        ("parameters", f"{r.parameters:,}"), ("weight dtype", r.dtype), ("compute dtype", r.compute_dtype),
        ("bytes on disk", _human_bytes(r.bytes_on_disk)),
        ("KV cache per token", f"{_human_bytes(r.kv_cache_bytes_per_token)} ({r.kv_cache_dtype})"),
        ("quantization", r.quantization or "none"),
        ("graph nodes", f"{r.graph_nodes} ({', '.join(f'{k} {v}' for k, v in sorted(r.ops.items()))})"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


@app.command("compile")
def compile_cmd(
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine directory to write (atomically)."),
    target: Optional[str] = typer.Option(None, "--target", help="cpu (default); onnx, tensorrt and triton are "
                                         "planned."),
    passes: Optional[str] = typer.Option(None, "--passes", help="Comma-separated pass list replacing the default "
                                         "pipeline, e.g. fuse-qkv,dce ('' for none)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A named recipe (profiles/NAME.toml) or a .toml "
                                          "file: its [compile] table sets the defaults of --target and --passes."),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="Write the graph after each pass here."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Compile a checkpoint into an engine: graph, fusion passes, packed weights, manifest."""
    from llmc.compiler import compile
    from llmc.profiles import resolve_options

    given = None if passes is None else [p.strip() for p in passes.split(",") if p.strip()]
    o = resolve_options("compile", dict(target=target, passes=given), dict(target="cpu"), profile)
    target, names = o["target"], o["passes"]
    with err.status(f"compiling {model} for {target}"):
        r = compile(model, output, target=target, passes=names, dump_ir=dump_ir, force=force)
    if as_json:
        _print_json({**asdict(r), "bytes": r.bytes})
        return
    t = Table(Column("pass"), Column("nodes", justify="right"), Column("ms", justify="right"),
              title=f"llmc compile · {model} → {output} ({r.target})")
    for p in r.passes:
        t.add_row(p["name"], f"{p['nodes_before']} → {p['nodes_after']}", f"{p['seconds'] * 1e3:.1f}")
    out.print(t)
    out.print(f"engine {r.engine}: {r.nodes} nodes, {_human_bytes(r.bytes)}, {r.seconds:.2f} s")


@app.command("generate")
def generate_cmd(
    path: Path = typer.Argument(..., help="A Hugging Face checkpoint or an engine directory."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Repeat for several prompts; they run as one "
                                     "in-flight batch."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the K most likely tokens."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Per-request seed: sampling becomes reproducible."),
    kernels: str = typer.Option("cpu", "--kernels", help="Kernel set: cpu (fast) or reference (the spec)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="Most sequences in one step."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: prompt, text, token_ids, finish_reason."),
) -> None:
    """Generate from one or more prompts, batched together (in-flight batching)."""
    from llmc.generate import generate
    from llmc.model import load_model
    from llmc.runtime.runner import RuntimeConfig
    from llmc.runtime.sampler import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    runtime = RuntimeConfig(kernels=kernels, max_num_seqs=max_num_seqs)
    with err.status(f"loading {path}"):
        model = load_model(path)
    with err.status(f"generating for {len(prompt)} prompt(s)"):
        r = generate(path, prompt, params, runtime, model=model)
    if as_json:
        _print_json([asdict(c) for c in r.completions])
    else:
        for c in r.completions:              # plain text: no wrapping, no markup in model output
            sys.stdout.write(f"{c.prompt}{c.text}\n[{len(c.token_ids)} tokens, {c.finish_reason}]\n\n")
    s = r.stats
    sys.stderr.write(f"{s.generated_tokens} tokens in {s.seconds:.2f} s: {s.tokens_per_second:,.1f} tok/s "
                     f"({len(prompt)} prompt(s), {s.prompt_tokens} prompt tokens, {s.steps} steps, "
                     f"{kernels} kernels)\n")


@app.command("quantize")
def quantize_cmd(
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory (not already quantized)."),
    output: Path = typer.Option(..., "-o", "--output", help="Quantized checkpoint directory to write (atomically)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="w8a16: int8 per-channel weights (~4x smaller "
                                         "than fp32); w4a16: int4 group-wise weights (~7x smaller); w8a8: int8 "
                                         "weights and per-token int8 inputs; fp8: e4m3 weights and inputs (static "
                                         "scales; emulated on CPU). Required unless the profile sets it."),
    profile: Optional[str] = typer.Option(None, "--profile", help="A named recipe (profiles/NAME.toml) or a .toml "
                                          "file: its [quantize] table sets the defaults of these options."),
    algo: Optional[str] = typer.Option(None, "--algo", help="rtn (round to nearest; the default); gptq "
                                       "(Hessian-guided error compensation) or awq (activation-aware scales) for "
                                       "w8a16/w4a16; smoothquant (outliers moved into the weights) for w8a8. All "
                                       "but rtn calibrate."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="SmoothQuant migration strength in [0, 1] "
                                          "(default 0.5)."),
    awq_clip: Optional[bool] = typer.Option(None, "--awq-clip/--no-awq-clip", help="AWQ: also search each "
                                            "group's clipping range (default on)."),
    observer: Optional[str] = typer.Option(None, "--observer", help="The range weight scales cover: minmax (all "
                                           "of it; the default), mse (the shrunk range with the least squared "
                                           "error) or percentile. rtn, gptq, smoothquant."),
    act_observer: Optional[str] = typer.Option(None, "--act-observer", help="The same for calibrated scales: fp8 "
                                               "inputs and the KV cache (minmax, percentile or mse)."),
    percentile: Optional[float] = typer.Option(None, "--percentile", help="For the percentile observers: the "
                                               "percentile of |x| a scale covers (default 99.99)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="w4a16 group size (default 128)."),
    asymmetric: Optional[bool] = typer.Option(None, "--asymmetric/--symmetric", help="w4a16 with zero points "
                                              "(default symmetric)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="int8 or fp8: store the KV cache quantized with "
                                           "calibrated per-head scales (4x fewer bytes per token than fp32)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text: .txt (cut into windows) or .jsonl "
                                         "(a 'text' field per line). Default: golden/calibration/tinystories_calib.txt."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration samples (default 128)."),
    calib_seqlen: Optional[int] = typer.Option(None, "--calib-seqlen", help="Tokens per calibration sample "
                                               "(default 512)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="llmc (default) or gptq: the qweight/qzeros/scales/"
                                      "g_idx layout transformers, vLLM and GPTQModel read (scales rounded to fp16)."),
    requantize: bool = typer.Option(False, "--requantize", help="Accept an already-quantized MODEL: its weights "
                                    "are dequantized first (errors compound; prefer the original)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantize a checkpoint's linear weights; the result runs with inspect, generate and compile."""
    from llmc.passes.quant.quantize import check_recipe, quantize_checkpoint
    from llmc.passes.quant.scheme import recipe_from_options
    from llmc.profiles import resolve_options

    o = resolve_options("quantize", dict(                      # the recipe's own defaults fill in the rest
        scheme=scheme, algo=algo, alpha=alpha, awq_clip=awq_clip, observer=observer, act_observer=act_observer,
        percentile=percentile, group_size=group_size, asymmetric=asymmetric, kv_cache=kv_cache, calib=calib,
        calib_samples=calib_samples, calib_seqlen=calib_seqlen, format=fmt), {"format": "llmc"}, profile)
    calib, fmt = (Path(o["calib"]) if o["calib"] is not None else None), o["format"]
    recipe = recipe_from_options(**{k: v for k, v in o.items() if k not in ("calib", "format")})
    check_recipe(recipe)

    started = []

    def progress(report, total: int) -> None:
        if not started:                      # printed once the input has been accepted
            started.append(True)
            w = recipe.scheme.weight
            err.print(f"quantizing {model} -> {output}: {recipe.scheme.name} ({w.key}"
                      f"{', g' + str(w.group_size) if w.group_size else ''}), {recipe.algorithm}", highlight=False)
        sq = f"weight SQNR min {report.sqnr_db_min:.1f} dB, mean {report.sqnr_db_mean:.1f} dB" \
            if report.sqnr_db_min is not None else "kept in full precision"
        if report.output_sqnr_db is not None:
            sq += f", output SQNR {report.output_sqnr_db:.1f} dB"
        name = f"layer {report.layer}" if report.layer != "other" else "embeddings/norms/head"
        err.print(f"  {name}: {report.quantized} weights quantized, {sq}, {report.seconds:.2f} s", highlight=False)

    if fmt not in ("llmc", "gptq"):
        raise ConfigError(f"unknown --format {fmt!r}; choose llmc or gptq")
    if fmt == "gptq" and output.exists() and not force:
        raise ConfigError(f"{output} already exists", hint="pass --force to replace it")
    target = output if fmt == "llmc" else output.with_name(f".{output.name}.llmc-tmp")
    export = None
    try:
        r = quantize_checkpoint(model, target, recipe, force=force or fmt == "gptq", calib=calib,
                                allow_requantize=requantize, on_layer=progress)
        if fmt == "gptq":
            from llmc.passes.quant.gptq_format import export_gptq
            export = export_gptq(target, output, round_scales=True, force=force)
            r = replace(r, output=str(output), bytes_out=export["bytes"])
    finally:
        if fmt == "gptq":
            shutil.rmtree(target, ignore_errors=True)
    if as_json:
        _print_json({**asdict(r), "format": fmt, "profile": profile,
                     **({"gptq_export": export} if export else {})})
        return
    sys.stdout.write(f"wrote {r.output}: {_human_bytes(r.bytes_in)} -> {_human_bytes(r.bytes_out)} "
              f"({r.bytes_in / max(r.bytes_out, 1):.1f}x smaller) in {r.seconds:.1f} s, "
              f"peak memory {_human_bytes(r.peak_rss_bytes)}\n")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: quality (throughput and serve are planned).")
app.add_typer(bench_app, name="bench")


@bench_app.command("quality")
def bench_quality_cmd(
    path: Path = typer.Argument(..., help="The model to measure: checkpoint, quantized checkpoint or engine."),
    reference: Path = typer.Option(..., "--reference", help="The reference model (e.g. the fp32 checkpoint)."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    seqlen: int = typer.Option(512, "--seqlen", help="Window length in tokens (BOS included)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the text."),
    kernels: str = typer.Option("cpu", "--kernels", help="Kernel set: cpu or reference."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Perplexity, KL divergence from the reference and top-1 agreement, over non-overlapping windows."""
    from llmc.bench.quality import quality
    from llmc.io import write_json_atomic

    with err.status("scoring") as status:
        r = quality(path, reference, text, seqlen=seqlen, max_tokens=max_tokens, kernels=kernels,
                    on_window=lambda w, n: status.update(f"scoring: {w} windows, {n:,} tokens"))
    if json_path is not None:
        write_json_atomic(json_path, {**asdict(r), "env": _env()})       # the metrics at the top level
    t = Table(*(Column(c, justify="right") for c in ("tokens", "perplexity", "reference ppl", "Δ ppl",
                                                      "KL (nats/token)", "top-1 agree")),
              title=f"llmc bench quality · {path} vs {reference}")
    t.add_row(f"{r.tokens:,}", f"{r.perplexity:.4f}", f"{r.reference_perplexity:.4f}",
              f"{100 * (r.perplexity / r.reference_perplexity - 1):+.2f}%", f"{r.kl_divergence:.5f}",
              f"{100 * r.top1_agreement:.2f}%")
    out.print(t)


def _env() -> dict:
    import torch

    from llmc.bench.environment import environment
    return environment(threads=torch.get_num_threads())


@app.command("version")
def version_cmd() -> None:
    """Print the llmc version."""
    out.print(f"llmc {__version__}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"] or ["--help"]
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="llmc", standalone_mode=False)
    except (typer.Exit, click.exceptions.Exit) as e:
        sys.exit(e.exit_code)
    except (typer.Abort, click.exceptions.Abort):
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except (click.exceptions.ClickException, typer.TyperException) as e:   # bad option or argument
        if debug:
            raise
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        sys.stderr.write(f"error: {_one_line(message)}\n")
        sys.exit(2)
    except LlmcError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e.one_line()}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # a bug in llmc: still one line, unless --debug
        if debug:
            raise
        sys.stderr.write(f"error: internal error: {type(e).__name__}: {_one_line(str(e))} "
                         f"(rerun with --debug for a traceback)\n")
        sys.exit(1)
