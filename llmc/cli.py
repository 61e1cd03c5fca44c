"""The `llmc` command line: thin wrappers over the library functions of the same names.

Results go to stdout (a rich table, or JSON with --json); progress and logs go to stderr. A user
error prints one line and exits 2; --debug shows the traceback instead.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import click
import typer
from rich.console import Console
from rich.table import Column, Table

from llmc import __version__
from llmc.errors import ConfigError, LlmcError, OptionError
from llmc.signals import Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="llmc: turn a Hugging Face causal LM into a fast engine and run it. "
                       "Add --debug to any command for a traceback on error.")
out, err = Console(), Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"llmc {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the llmc version and exit.")) -> None:
    """llmc: turn a Hugging Face causal LM into a fast engine and run it. Add --debug to any command for a
    traceback on error."""


def flag(option: str) -> str:
    """A library option name as the command line spells it: group_size -> --group-size."""
    return "--" + option.replace("_", "-")


@contextmanager
def options_named(origins: dict[str, str] | None = None) -> Iterator[None]:
    """Report a bad option value (OptionError) by its flag and, when it did not come from the
    command line, where it came from: `--group-size (from profile int4-gptq): ...`."""
    try:
        yield
    except OptionError as e:
        origin = (origins or {}).get(e.option, "command line")
        where = "" if origin == "command line" else f" (from {origin})"
        raise ConfigError(f"{flag(e.option)}{where}: {e.reason}", hint=e.hint) from None


def profile_option(table: str, sets: str):
    """--profile of a verb whose [table] in the profile sets the defaults of `sets`."""
    return typer.Option(None, "--profile", help=f"A bundled recipe (int8, int4-gptq, ...; see profiles/ in the "
                        f"repository) or a .toml file: its [{table}] table sets the defaults of {sets}.")


def _check_result_file(json_path: str | None, inputs: list) -> None:
    """A bench's --json FILE may be written (a new file, or one llmc wrote): checked before the work."""
    from llmc.io import check_output
    if json_path not in (None, "-"):
        check_output(json_path, inputs, force=True, directory=False, what="result file")


def _write_result(json_path: str | None, result: dict, inputs: list) -> bool:
    """A bench's result to --json: `-` prints it instead of the table (returns True), a path gets it
    written atomically, stamped as llmc's."""
    from llmc.io import stamp_json, write_result_json
    if json_path == "-":
        _print_json(stamp_json(result))
        return True
    if json_path is not None:
        write_result_json(Path(json_path), result, inputs)
    return False


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
    if r.kind == "engine":
        rows += [("kernels", r.kernels or "—"), ("artifact", r.artifact or "—"), ("requires", r.requires or "—")]
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)


@app.command("compile")
def compile_cmd(
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine directory to write (atomically)."),
    target: Optional[str] = typer.Option(None, "--target", help="cpu (default), or onnx (ONNX standard ops, run "
                                         "by ONNX Runtime; needs the onnx extra), tensorrt (a TensorRT plan "
                                         "for this machine's NVIDIA GPU; needs the gpu extra) or triton (Triton "
                                         "kernels, for NVIDIA GPUs)."),
    passes: Optional[str] = typer.Option(None, "--passes", help="Comma-separated pass list replacing the default "
                                         "pipeline, e.g. fuse-qkv,dce ('' for none)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16: what the engine stores its "
                                        "float weights as (a quantized checkpoint's packed matrices stay packed). "
                                        "Default: fp32."),
    profile: Optional[str] = profile_option("compile", "--target and --passes"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="Write the graph after each pass into this "
                                           "directory (a new one, or one llmc wrote, with --force), and what the "
                                           "target lowered it to (onnx: target-onnx.txt, the ONNX graph as text)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT (and the --dump-ir directory) if llmc wrote "
                               "it; never a directory holding other files."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Compile a checkpoint into an engine: graph, fusion passes, packed weights, manifest."""
    from llmc.compiler import compile
    from llmc.profiles import option_origins, resolve_options
    from llmc.targets import DEFAULT_TARGET

    given = None if passes is None else [p.strip() for p in passes.split(",") if p.strip()]
    options = dict(target=target, passes=given)
    o = resolve_options("compile", options, dict(target=DEFAULT_TARGET), profile)
    target, names = o["target"], o["passes"]
    with options_named(option_origins("compile", options, profile)), err.status(f"compiling {model} for {target}"):
        r = compile(model, output, target=target, passes=names, dump_ir=dump_ir, force=force, dtype=dtype)
    if as_json:
        _print_json({**asdict(r), "bytes": r.bytes})
        return
    t = Table(Column("pass"), Column("nodes", justify="right"), Column("ms", justify="right"),
              title=f"llmc compile · {model} → {output} ({r.target})")
    for p in r.passes:
        t.add_row(p["name"], f"{p['nodes_before']} → {p['nodes_after']}", f"{p['seconds'] * 1e3:.1f}")
    out.print(t)
    out.print(f"engine {r.engine}: {r.nodes} nodes, {_human_bytes(r.bytes)}, {r.seconds:.2f} s")


KERNELS_HELP = ("Kernel set (default: the target's; on the cpu target native, one native call per step, for every "
                "model it runs, else cpu; reference is the spec).")
THREADS_HELP = ("Threads (default: the cores this process may use; the native kernels use fewer while other "
                "processes keep cores busy).")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise OptionError("threads", f"must be at least 1, got {threads}")
        import torch
        torch.set_num_threads(threads)


def _read_prompts(prompt: list[str], prompt_file: Path | None) -> list[str]:
    """--prompt (repeatable; `-` reads one prompt from stdin) and --prompt-file (one prompt per line)."""
    prompts = [sys.stdin.read() if p == "-" else p for p in prompt]
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt-file {prompt_file}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT (repeatable; '-' reads stdin) or --prompt-file FILE")
    return prompts


@app.command("generate")
def generate_cmd(
    path: Path = typer.Argument(..., help="A Hugging Face checkpoint or an engine directory."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Repeat for several prompts; they run as one "
                                     "in-flight batch. '-' reads a prompt from stdin."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="A UTF-8 file of prompts, one per "
                                               "(non-empty) line."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the K most likely tokens."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Per-request seed: sampling becomes reproducible."),
    stop: list[str] = typer.Option([], "--stop", help="Repeat (up to 4): a string that ends the text; it is not "
                                   "printed."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Go on past end-of-sequence tokens."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", help="With --json: each token's log-probability "
                                           "and the N (0-20) most likely alternatives."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="In [-2, 2]: subtracted from the "
                                           "logit of every token generated so far."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="In [-2, 2]: subtracted once per "
                                            "time a token was generated."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 0: divides positive (multiplies "
                                             "negative) logits of prompt and generated tokens."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help=KERNELS_HELP),
    device: str = typer.Option("cpu", "--device", help="Device to run on (the cpu target runs on cpu)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="Most sequences in one step."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: prompt, text, token_ids, finish_reason, "
                                 "stop_reason, logprobs."),
) -> None:
    """Generate from one or more prompts, batched together (in-flight batching). One prompt on a
    terminal streams its text as it is produced."""
    from llmc.generation import generate
    from llmc.loader import load_model
    from llmc.runtime.runner import RuntimeConfig
    from llmc.runtime.sampler import SamplingParams

    with options_named():
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=tuple(stop), ignore_eos=ignore_eos, logprobs=logprobs,
                                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                repetition_penalty=repetition_penalty)
        runtime = RuntimeConfig(kernels=kernels, device=device, max_num_seqs=max_num_seqs)
        _set_threads(threads)
    prompts = _read_prompts(prompt, prompt_file)
    with err.status(f"loading {path}"):
        model = load_model(path)
    live = len(prompts) == 1 and not as_json and sys.stdout.isatty()
    if live:                                 # the text as it comes: prompt, then each piece
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        r = generate(path, prompts, params, runtime, model=model,
                     on_text=lambda i, text: (sys.stdout.write(text), sys.stdout.flush()))
    else:
        with err.status(f"generating for {len(prompts)} prompt(s)"):
            r = generate(path, prompts, params, runtime, model=model)
    if as_json:
        _print_json([asdict(c) for c in r.completions])
    else:
        for c in r.completions:              # plain text: no wrapping, no markup in model output
            head = "" if live else f"{c.prompt}{c.text}"
            sys.stdout.write(f"{head}\n[{len(c.token_ids)} tokens, {c.finish_reason}]\n\n")
    s = r.stats
    sys.stderr.write(f"{s.generated_tokens} tokens in {s.seconds:.2f} s: {s.tokens_per_second:,.1f} tok/s "
                     f"({len(prompts)} prompt(s), {s.prompt_tokens} prompt tokens, {s.steps} steps, "
                     f"{r.backend['kernels']} kernels)\n")


@app.command("serve")
def serve_cmd(
    path: Path = typer.Argument(..., help="A checkpoint, quantized checkpoint or engine directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 or :: to accept other machines)."),
    port: int = typer.Option(8000, "--port", help="TCP port; 0 picks a free one (printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLMC_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1/*."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", help="Most sequences in one step "
                                               "(default 16)."),
    max_batched_tokens: Optional[int] = typer.Option(None, "--max-batched-tokens", help="Most tokens in one step; "
                                                     "longer prompts are prefilled in chunks (default 256: about "
                                                     "one prompt per step, so a burst of prompts does not stall "
                                                     "every stream)."),
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", help="KV-cache blocks of 16 tokens (default: "
                                            "--max-num-seqs full-context sequences, within 2 GiB)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests that may wait; more get 429 "
                                            "(default 256)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model's name in the "
                                                    "API (default: PATH's directory name)."),
    prefix_cache: Optional[bool] = typer.Option(None, "--prefix-cache/--no-prefix-cache", help="Share the KV "
                                                "blocks of common prompt prefixes between requests (default on)."),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help="Seconds a request may run; "
                                                    "then it ends with finish_reason 'abort'."),
    drain_timeout: Optional[float] = typer.Option(None, "--drain-timeout", help="On SIGTERM/SIGINT: seconds "
                                                  "in-flight requests get to finish (default 30)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="A Jinja chat template file "
                                                 "(default: tokenizer_config.json's chat_template)."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help=KERNELS_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    profile: Optional[str] = profile_option("runtime", "the runtime options"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models; /health, /ready, /metrics) with in-flight batching and prefix caching."""
    from llmc.profiles import option_origins, resolve_options
    from llmc.runtime.runner import RuntimeConfig

    try:
        from llmc.server.serve import SERVE_MAX_BATCHED_TOKENS, ServeConfig, serve
    except ImportError as e:
        raise ConfigError(f"llmc serve needs the serve extra ({e.name} is missing)",
                          hint="pip install 'llmc[serve]'") from None
    given = dict(max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens, kv_blocks=kv_blocks,
                 prefix_cache=prefix_cache, kernels=kernels, threads=threads, max_queue=max_queue,
                 request_timeout=request_timeout, drain_timeout=drain_timeout)
    defaults = dict(max_num_seqs=16, max_batched_tokens=SERVE_MAX_BATCHED_TOKENS, prefix_cache=True, max_queue=256,
                    drain_timeout=30.0)
    o = resolve_options("runtime", given, defaults, profile)
    with options_named(option_origins("runtime", given, profile)):
        _set_threads(o["threads"])
        runtime = RuntimeConfig(kernels=o["kernels"], max_num_seqs=o["max_num_seqs"],
                                max_batched_tokens=o["max_batched_tokens"], num_blocks=o["kv_blocks"],
                                prefix_caching=o["prefix_cache"])
        config = ServeConfig(host=host, port=port, api_key=api_key, served_model_name=served_model_name,
                             max_queue=o["max_queue"], request_timeout=o["request_timeout"],
                             drain_timeout=o["drain_timeout"], chat_template=chat_template, runtime=runtime)

    def listening(url: str, s: dict) -> None:
        sys.stdout.write(
            f"llmc serve: {s['model']} ({s['architecture']}, {s['quantization']}; {s['kernels']} kernels)\n"
            f"  KV cache {s['kv_cache_tokens']:,} tokens ({s['kv_cache_dtype']}), context {s['max_model_len']:,}, "
            f"up to {s['max_num_seqs']} sequences per step, prefix caching {'on' if s['prefix_caching'] else 'off'}\n"
            f"  chat template {'yes' if s['chat_template'] else 'none'}; API key "
            f"{'required' if s['auth'] else 'not required'}\n"
            f"listening on {url}\n")
        sys.stdout.flush()

    with err.status(f"loading {path}"):
        from llmc.loader import load_model
        model = load_model(path)
    raise typer.Exit(serve(path, config, model=model, on_listening=listening))


RECIPE_OPTIONS = "llmc.recipe_options"        # ctx.meta key: the recipe options `llmc quantize` was given


class _QuantizeCommand(typer.core.TyperCommand):
    """`llmc quantize`: its recipe options are the ones QuantRecipe declares (llmc.quantized.scheme),
    added when the command parses its arguments or shows its help, not when the CLI starts: the
    declarations import torch, which `llmc --version` and every other command's help should not wait
    for. Their values reach quantize_cmd as ctx.meta[RECIPE_OPTIONS], each None when not given."""

    recipe_params: tuple | None = None                    # built on first use

    def get_params(self, ctx: typer.Context) -> list:
        """The declared parameters with the recipe options after -o (where --help lists them)."""
        if self.recipe_params is None:
            self.recipe_params = _recipe_params()
        params = super().get_params(ctx)
        at = next(i for i, p in enumerate(params) if p.name == "output") + 1      # after -o, as before
        return [*params[:at], *self.recipe_params, *params[at:]]

    def invoke(self, ctx: typer.Context):
        """Hand the recipe options over in ctx.meta: the callback typer made takes only its own."""
        ctx.meta[RECIPE_OPTIONS] = {p.name: ctx.params.pop(p.name) for p in self.recipe_params or ()}
        return super().invoke(ctx)


def _recipe_params() -> tuple:
    """One option per declared recipe option, made by typer from a signature as for any command
    (flag, type, help), defaulting to None: unset, the profile's value or the recipe's default
    applies (llmc.profiles.resolve_options, recipe_from_options)."""
    import inspect

    from llmc.quantized.scheme import QUANTIZE_OPTIONS

    def recipe_options(**given) -> None:
        """Never called: typer reads its signature."""
    recipe_options.__signature__ = inspect.Signature([
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[o.type],
                          default=typer.Option(None, o.flags, help=o.help_text))
        for o in QUANTIZE_OPTIONS.values()])
    holder = typer.Typer(add_completion=False)
    holder.command()(recipe_options)
    return tuple(typer.main.get_command(holder).params)


@app.command("quantize", cls=_QuantizeCommand)
def quantize_cmd(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="A Hugging Face checkpoint directory (not already quantized)."),
    output: Path = typer.Option(..., "-o", "--output", help="Quantized checkpoint directory to write (atomically)."),
    profile: Optional[str] = profile_option("quantize", "these options"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text: .txt (cut into windows) or .jsonl "
                                         "(a 'text' field per line). Default: a TinyStories excerpt that ships "
                                         "with llmc (llmc/data/tinystories_calib.txt)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="llmc (default) or gptq: the qweight/qzeros/scales/"
                                      "g_idx layout transformers, vLLM and GPTQModel read (fp16 scales, as "
                                      "llmc's own)."),
    requantize: bool = typer.Option(False, "--requantize", help="Accept an already-quantized MODEL: its weights "
                                    "are dequantized first (errors compound; prefer the original)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quantize a checkpoint's linear weights; the result runs with inspect, generate and compile."""
    from llmc.passes.quant.algorithms import applicable_options, check_recipe
    from llmc.quantizer import quantize
    from llmc.quantized.scheme import recipe_from_options
    from llmc.profiles import option_origins, resolve_options

    given = {**ctx.meta[RECIPE_OPTIONS], "calib": calib, "format": fmt}
    o = resolve_options("quantize", given, {"format": "llmc"}, profile)   # the recipe's defaults fill in the rest
    origins = option_origins("quantize", given, profile)
    with options_named(origins):
        recipe = recipe_from_options(**{k: v for k, v in o.items() if k not in ("calib", "format")})
        check_recipe(recipe)
        for option in sorted(k for k, v in o.items() if v is not None and k not in applicable_options(recipe)):
            if origins[option] == "command line":
                raise OptionError(option, f"has no effect on {recipe.scheme.name} with {recipe.algorithm}",
                                  hint="drop it")
            if origins[option] != "default":
                err.print(f"note: {flag(option)} from {origins[option]} has no effect on {recipe.scheme.name} with "
                          f"{recipe.algorithm}; ignored", highlight=False, soft_wrap=True)
    calib, fmt = (Path(o["calib"]) if o["calib"] is not None else None), o["format"]

    started = []

    def progress(report, total: int) -> None:
        if not started:                      # printed once the input has been accepted
            started.append(True)
            w = recipe.scheme.weight
            err.print(f"quantizing {model} -> {output}: {recipe.scheme.name} ({w.key}"
                      f"{', g' + str(w.group_size) if w.group_size else ''}), {recipe.algorithm}", highlight=False, soft_wrap=True)
        sq = f"weight SQNR min {report.sqnr_db_min:.1f} dB, mean {report.sqnr_db_mean:.1f} dB" \
            if report.sqnr_db_min is not None else "kept in full precision"
        if report.output_sqnr_db is not None:
            sq += f", output SQNR {report.output_sqnr_db:.1f} dB"
        name = f"layer {report.layer}" if report.layer != "other" else "embeddings/norms/head"
        err.print(f"  {name}: {report.quantized} weights quantized, {sq}, {report.seconds:.2f} s", highlight=False, soft_wrap=True)

    status = None

    def measuring(what: str, done: int, total: int) -> None:
        nonlocal status
        if status is None:
            status = err.status("measuring sensitivity")
            status.start()
        status.update(f"measuring sensitivity: {done}/{total} ({what})")
        if done == total:
            status.stop()

    with options_named(origins):
        try:
            r, export = quantize(model, output, recipe, format=fmt, force=force, calib=calib,
                                 allow_requantize=requantize, fit_context=origins["calib_seqlen"] == "default",
                                 on_layer=progress, on_progress=measuring)
        finally:
            if status is not None:
                status.stop()
    if r.recipe["calib_seqlen"] < recipe.calib_seqlen:
        err.print(f"note: --calib-seqlen {recipe.calib_seqlen} (the default) was capped at the model's context, "
                  f"{r.recipe['calib_seqlen']}", highlight=False, soft_wrap=True)
    if as_json:
        _print_json({**asdict(r), "format": fmt, "profile": profile,
                     **({"gptq_export": export} if export else {})})
        return
    sys.stdout.write(f"wrote {r.output}: {_human_bytes(r.bytes_in)} -> {_human_bytes(r.bytes_out)} "
              f"({r.bytes_in / max(r.bytes_out, 1):.1f}x smaller) in {r.seconds:.1f} s, "
              f"peak memory {_human_bytes(r.peak_rss_bytes)}\n")
    if r.mixed_precision is not None:
        sys.stdout.write(_plan_text(r.mixed_precision))
    elif r.sensitivity is not None:
        sys.stdout.write(_sensitivity_text(r.sensitivity))


def _plan_text(plan: dict) -> str:
    """What a mixed-precision target chose, unit by unit."""
    width = max(len(u["unit"]) for u in plan["units"])
    fwidth = max(len(u["format"]) for u in plan["units"])
    lines = [f"mixed precision: {plan['bits_per_weight']:.3f} bits per weight over the chosen weights, "
             f"{plan['bytes']:,} of {plan['budget_bytes']:,} bytes; predicted KL {plan['predicted_kl']:.5f}"]
    lines += [f"  {u['unit']:<{width}}  {u['format']:<{fwidth}} {u['bytes']:>10,} B  KL {u['predicted_kl']:.5f}"
              for u in plan["units"]]
    return "\n".join(lines) + "\n"


def _sensitivity_text(table: dict) -> str:
    """The sensitivity table: each unit's predicted KL in each candidate format."""
    width = max(len(u["unit"]) for u in table["units"])
    lines = [f"sensitivity (KL from the float model, nats per token, over {table['tokens']:,} calibration tokens):"]
    for u in table["units"]:
        cells = ", ".join(f"{c['format']} {c['kl']:.5f}" for c in u["candidates"])
        lines.append(f"  {u['unit']:<{width}}  {cells}")
    return "\n".join(lines) + "\n"


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: quality, offline throughput, and online load "
                        "against a server (serve).")
app.add_typer(bench_app, name="bench")


@bench_app.command("quality")
def bench_quality_cmd(
    path: Path = typer.Argument(..., help="The model to measure: checkpoint, quantized checkpoint or engine."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="The reference model (e.g. the fp32 "
                                             "checkpoint). Required unless --reference-logits."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    seqlen: int = typer.Option(512, "--seqlen", help="Window length in tokens (BOS included)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the text."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help=KERNELS_HELP),
    device: str = typer.Option("cpu", "--device", help="Device to run on (the cpu target runs on cpu)."),
    save_reference: Optional[Path] = typer.Option(None, "--save-reference", help="Also save the reference's top-k "
                                                  "log-probabilities per scored token to this file (safetensors), "
                                                  "for later runs with --reference-logits."),
    reference_logits: Optional[Path] = typer.Option(None, "--reference-logits", help="Score against logits saved "
                                                    "by --save-reference instead of running --reference (same text, "
                                                    "--seqlen and --max-tokens; KL over the top-k and the rest of "
                                                    "the mass)."),
    top_k: int = typer.Option(32, "--top-k", help="With --save-reference: log-probabilities kept per token."),
    protocol: str = typer.Option("windows", "--protocol", help="windows: consecutive windows of --seqlen, BOS "
                                 "first, every token scored; llama-perplexity: llama.cpp's llama-perplexity "
                                 "chunks of --seqlen (-c), first token BOS, the second half scored."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the result (schema "
                                            "llmc.bench.result/1, every window's sums) as JSON to this file "
                                            "('-': to stdout, instead of the table). An existing file is replaced "
                                            "only if llmc wrote it."),
) -> None:
    """Perplexity, KL divergence from the reference and top-1 agreement, over non-overlapping windows."""
    from llmc.bench.quality import quality

    inputs = [p for p in (path, reference, text, reference_logits) if p is not None]
    _check_result_file(json_path, inputs)
    with options_named(), err.status("scoring") as status:
        r = quality(path, reference, text, seqlen=seqlen, max_tokens=max_tokens, kernels=kernels, device=device,
                    save_reference=save_reference, reference_logits=reference_logits, top_k=top_k,
                    protocol_name=protocol,
                    on_window=lambda w, n: status.update(f"scoring: {w} windows, {n:,} tokens"))
    if save_reference is not None:
        err.print(f"saved the reference's top-{top_k} log-probabilities of {r.tokens:,} tokens to {save_reference}",
                  markup=False, highlight=False)
    if _write_result(json_path, r.to_result(_env()).to_json(), inputs):
        return
    t = Table(*(Column(c, justify="right") for c in ("tokens", "perplexity", "reference ppl", "Δ ppl",
                                                      "KL (nats/token)", "top-1 agree")),
              title=f"llmc bench quality · {path} vs {r.reference}",
              caption=None if r.config["kl"] == "exact" else f"KL over the reference's {r.config['kl']}")
    t.add_row(f"{r.tokens:,}", f"{r.perplexity:.4f}", f"{r.reference_perplexity:.4f}",
              f"{100 * (r.perplexity / r.reference_perplexity - 1):+.2f}%", f"{r.kl_divergence:.5f}",
              f"{100 * r.top1_agreement:.2f}%")
    out.print(t)


@bench_app.command("throughput")
def bench_throughput_cmd(
    path: Path = typer.Argument(..., help="The model to measure: checkpoint, quantized checkpoint or engine."),
    batch: str = typer.Option("1,8,32", "--batch", help="Comma-separated batch sizes: one Runner each, the whole "
                              "batch prefilled in one step."),
    input_len: int = typer.Option(128, "--input-len", help="Prompt length: random token ids (seeded; the "
                                  "tokenizer's BOS/EOS and ids below 3 excluded)."),
    output_len: int = typer.Option(128, "--output-len", help="Tokens generated per prompt (greedy, EOS ignored)."),
    repeat: int = typer.Option(3, "--repeat", help="Timed runs per batch size: median, min and max over them."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs per batch size before the timed ones."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for the run (default: the cores "
                                          "this process may use)."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help=KERNELS_HELP),
    profile: bool = typer.Option(False, "--profile", help="Also print where a decode step's time goes, per op "
                                 "(native kernels; always in the JSON as decode_profile_ms)."),
    against: Optional[str] = typer.Option(None, "--against", metavar="PATH|reference-kernels", help="Also run "
                                          "another model (PATH), or this one on the reference kernels, beside "
                                          "this one run by run, and report speed as a ratio of theirs: a gate on "
                                          "the ratio holds on a machine that is slower today."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the result (schema "
                                            "llmc.bench.result/1, every raw sample) as JSON to this file ('-': "
                                            "to stdout, instead of the table). An existing file is replaced only "
                                            "if llmc wrote it."),
) -> None:
    """Offline throughput over a sweep of batch sizes: prefill, decode and end-to-end tok/s, time to first token."""
    from llmc.bench.throughput import parse_batches, throughput

    with options_named():
        batches = parse_batches(batch)
    _check_result_file(json_path, [path] + ([Path(against)] if against and against != "reference-kernels" else []))

    def progress(b: int, label: str, s) -> None:
        decode = f"{s.decode_tok_s:,.1f}" if s.decode_tok_s is not None else "-"
        err.print(f"  batch {b} {label}: prefill {s.prefill_tok_s:,.1f} tok/s, decode {decode} tok/s, "
                  f"TTFT {s.ttft_ms:,.1f} ms", highlight=False, soft_wrap=True)

    with options_named(), err.status(f"measuring {path}"):
        r = throughput(path, batches, input_len=input_len, output_len=output_len, repeat=repeat, warmup=warmup,
                       threads=threads, kernels=kernels, on_run=progress, against=against)
    if not _write_result(json_path, r.to_json(), [path]):
        _throughput_table(r, path)
        if profile:
            _profile_table(r)


def _profile_table(r) -> None:
    """Per batch size, the decode step's milliseconds by op (Sample.decode_profile)."""
    rows = [(b.batch, b.decode_profile()) for b in r.results]
    if all(p is None for _, p in rows):
        err.print("note: no decode profile: the per-op timer is in the native kernels (--kernels native)")
        return
    ops = [op for op in next(p for _, p in rows if p is not None)]
    t = Table(Column("op"), *(Column(f"batch {b} ms", justify="right") for b, _ in rows),
              title="where a decode step's time goes")
    for op in ops:
        t.add_row(op, *("-" if p is None else f"{p.get(op, 0.0):.2f}" for _, p in rows))
    t.add_row("step", *("-" if p is None else f"{sum(p.values()):.2f}" for _, p in rows))
    out.print(t)


def _throughput_table(r, path: Path) -> None:
    """The result as a table on stdout: medians, and the decode spread over the timed runs; with
    --against, the medians of the per-run speed ratios."""
    import statistics

    def fmt(m, spread: bool = False) -> str:
        if m is None:
            return "-"
        return f"{m['median']:,.1f}" + (f" [{m['min']:,.1f}–{m['max']:,.1f}]" if spread else "")

    def ratio(b, name: str) -> str:
        values = [x[f"{name}_ratio"] for x in b.ratios()]
        return "-" if not values or None in values else f"{statistics.median(values):.2f}×"

    c, env = r.config, r.env
    against = c.get("against")
    heads = ["batch", "prefill tok/s", "decode tok/s median \\[min–max]", "e2e tok/s", "TTFT ms"]
    t = Table(*(Column(h, justify="right") for h in heads + (["prefill ×", "decode ×"] if against else [])),
              title=f"llmc bench throughput · {path}",
              caption=f"input {c['input_len']}, output {c['output_len']} tokens, greedy, medians of {c['repeat']} "
                      f"runs after {c['warmup']} warm-up\n{env['threads']} threads, {r.backend['kernels']} "
                      f"kernels; 1-min load {env['loadavg_start'][0]:.1f} → {env['loadavg_end'][0]:.1f}; "
                      f"peak RSS {_human_bytes(r.peak_rss_bytes)}" +
                      (f"\n×: this model's speed over {against}'s in the run beside it (median of {c['repeat']})"
                       if against else ""))
    for b in r.results:
        t.add_row(str(b.batch), fmt(b.stat("prefill_tok_s")), fmt(b.stat("decode_tok_s"), spread=True),
                  fmt(b.stat("e2e_tok_s")), fmt(b.stat("ttft_ms")),
                  *([ratio(b, "prefill_tok_s"), ratio(b, "decode_tok_s")] if against else []))
    out.print(t)


@bench_app.command("serve")
def bench_serve_cmd(
    url: Optional[str] = typer.Option(None, "--url", help="A running OpenAI-compatible server, http://HOST:PORT "
                                      "(llmc serve, vLLM, llama.cpp's llama-server, ...)."),
    launch: Optional[Path] = typer.Option(None, "--launch", help="Instead of --url: start `llmc serve PATH` on "
                                          "127.0.0.1 (a free port) for the run, and stop it after."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Prompts: .txt (consecutive windows of "
                                           "--input-len tokens, words without a tokenizer) or .jsonl (a 'prompt' "
                                           "string per line); reused when fewer than --num-requests. Default: "
                                           "--input-len random token ids."),
    input_len: int = typer.Option(128, "--input-len", help="Prompt length in tokens (random prompts, .txt windows)."),
    output_len: int = typer.Option(128, "--output-len", help="Tokens asked of every request (max_tokens, "
                                   "temperature 0, EOS ignored)."),
    num_requests: int = typer.Option(32, "--num-requests", help="Requests in the run."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Requests kept in flight (a closed "
                                              "loop; default 1: an unloaded server's latency). With "
                                              "--request-rate: the most in flight."),
    request_rate: Optional[float] = typer.Option(None, "--request-rate", help="Poisson arrivals at R requests/s "
                                                 "(inf: all at once); in flight unbounded unless --concurrency."),
    seed: int = typer.Option(0, "--seed", help="Seeds the random prompts and the arrival times (a server's "
                             "prompt cache remembers the prompts of an earlier run with the same seed)."),
    slo: Optional[str] = typer.Option(None, "--slo", help="ttft=MS,tpot=MS (either or both): goodput counts the "
                                      "successful requests meeting it."),
    model: Optional[str] = typer.Option(None, "--model", help="The model name sent (default: the first of GET "
                                        "/v1/models)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Sent as 'Authorization: Bearer KEY' (never "
                                          "written to the result)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A checkpoint directory (tokenizer.json, "
                                             "config.json): the vocabulary of random prompts, .txt windows, prompt "
                                             "token counts. Default: the --launch PATH."),
    serve_arg: Optional[list[str]] = typer.Option(None, "--serve-arg", metavar="ARG", help="Repeat: one argument for the "
                                                  "launched server, e.g. --serve-arg=--max-num-seqs=8."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds one request may take; a slower one fails."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the result (schema "
                                            "llmc.bench.result/1, every request's times) as JSON to this file "
                                            "('-': to stdout, instead of the table). An existing file is replaced "
                                            "only if llmc wrote it."),
) -> None:
    """Online load against an OpenAI-compatible completions endpoint: TTFT, TPOT, ITL, e2e latency
    (mean, p50/p90/p99), throughput and goodput, at a concurrency or a Poisson request rate."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmc.bench.serve import bench_serve

    inputs = [p for p in (launch, dataset, tokenizer) if p is not None]
    _check_result_file(json_path, inputs)
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("preparing the prompts", total=max(num_requests, 1))
        with options_named():
            r = bench_serve(url, launch=launch, dataset=dataset, input_len=input_len, output_len=output_len,
                            num_requests=num_requests, concurrency=concurrency, request_rate=request_rate,
                            seed=seed, slo=slo, model=model, api_key=api_key, tokenizer=tokenizer,
                            serve_args=serve_arg or (), timeout=timeout,
                            on_status=lambda text: progress.update(task, description=text),
                            on_request=lambda done, total, s: progress.update(task, completed=done))
    if not _write_result(json_path, r.to_json(), inputs):
        _serve_tables(r)
    _serve_notes(r)


def _serve_tables(r) -> None:
    """Latencies (mean and percentiles), then the run's rates and counts."""
    from rich.markup import escape

    from llmc.bench.serve import LATENCY_STATS

    c, env, v = r.config, r.env, r.value
    width = 78
    t = Table(Column("latency"), *(Column(h, justify="right") for h in LATENCY_STATS),
              title=f"llmc bench serve · {escape(r.model['name'])} at {escape(r.server['url'])}", min_width=width)
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_ms", "ITL ms"), ("e2e_ms", "e2e ms")):
        t.add_row(label, *("-" if v(f"{key}_{q}") is None else f"{v(f'{key}_{q}'):,.1f}" for q in LATENCY_STATS))
    out.print(t)
    slo = ", ".join(f"{k.split('_')[0].upper()} ≤ {x:g} ms" for k, x in c["slo"].items() if x is not None)
    tokens_in = v("total_input_tokens")
    rows = [("requests", f"{v('completed')} ok, {v('failed')} failed"),
            ("request throughput", f"{v('request_throughput'):,.2f} req/s"),
            ("output throughput", f"{v('output_throughput'):,.1f} tok/s"),
            *([("goodput", f"{v('goodput'):,.2f} req/s ({slo})")] if "goodput" in r.metrics else []),
            ("tokens in / out", f"{'-' if tokens_in is None else f'{tokens_in:,}'} / {v('total_output_tokens'):,}"),
            ("duration", f"{v('duration_s'):,.2f} s")]
    s = Table(Column("run"), Column("value", justify="right"), min_width=width,
              caption=escape(f"{c['num_requests']} requests, {c['arrivals']}; {c['output_len']} output tokens "
                             f"each; prompts: {c['prompts']}\n1-min load on this machine "
                             f"{env['loadavg_start'][0]:.1f} → {env['loadavg_end'][0]:.1f}"))
    for row in rows:
        s.add_row(*row)
    out.print(s)


def _serve_notes(r) -> None:
    """On stderr: failed requests, and outputs of another length than asked (a server ignoring ignore_eos)."""
    failed = [s for s in r.samples if not s.ok]
    if failed:
        err.print(f"note: {len(failed)} of {len(r.samples)} requests failed; the first: {failed[0].error}",
                  markup=False, highlight=False, soft_wrap=True)
    asked = r.config["output_len"]
    other = [s for s in r.samples if s.ok and s.output_tokens != asked]
    if other:
        err.print(f"note: {len(other)} requests returned other than {asked} tokens (from "
                  f"{min(s.output_tokens for s in other)} to {max(s.output_tokens for s in other)}); does the server "
                  f"honour ignore_eos?", markup=False, highlight=False, soft_wrap=True)


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


import llmc.cli_results  # noqa: E402,F401  (registers gate and bench report on app)


def main(argv: list[str] | None = None) -> None:
    """Run the command line. Exit codes: 0 success, 2 a user error (one line on stderr), 130 / 143
    interrupted by SIGINT / SIGTERM (one line), 1 an internal error (a bug: one line, or the
    traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"] or ["--help"]
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="llmc", standalone_mode=False)
    except Interrupted as e:                 # SIGINT / SIGTERM (llmc.signals): outputs were unwound
        sys.stderr.write(f"{e.message}\n")
        sys.exit(e.exit_code)
    except (typer.Exit, click.exceptions.Exit) as e:
        sys.exit(e.exit_code)
    except (typer.Abort, click.exceptions.Abort):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except (click.exceptions.ClickException, typer.TyperException) as e:   # bad option or argument
        if type(e).__name__ == "NoArgsIsHelpError" and getattr(e, "ctx", None) is not None:
            sys.stdout.write(e.ctx.get_help() + "\n")        # `llmc bench`: its help, as for `llmc`
            sys.exit(0)
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
    except OSError as e:                     # the machine said no: a file, a permission, a full disk
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"error: {where}{e.strerror or _one_line(str(e))}\n")
        sys.exit(2)
    except Exception as e:  # a bug in llmc: still one line, unless --debug
        if debug:
            raise
        sys.stderr.write(f"error: internal error: {type(e).__name__}: {_one_line(str(e))} "
                         f"(rerun with --debug for a traceback, and report it with that traceback)\n")
        sys.exit(1)
    if isinstance(rv, int) and rv:           # typer returns 130 for a KeyboardInterrupt it caught
        if rv == 130:
            sys.stderr.write("interrupted\n")
        sys.exit(rv)
