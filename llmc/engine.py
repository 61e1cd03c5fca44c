"""The engine format: a directory holding

- `engine.json`: schema version, llmc version, architecture config, target and its `backend`
  section (device, kernel set, the kernel set of each op), compute dtype, the optimised graph, the
  passes log, tokenizer info and the sha256 and size of every other file;
- `weights.safetensors`: every weight the graph reads (never pickle), written by the target's lowering;
- the target's other artifact files, if it has any;
- the tokenizer files of the source checkpoint.

It is written atomically (temporary directory + rename): the target lowers the model into the
temporary directory, then the manifest lists and hashes what is there. Loading checks the schema,
that this llmc runs the target, then the size and sha256 of every listed file, and names the file
that is missing, truncated or altered. Engines of an older schema are refused with the command that
rebuilds them.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from llmc import __version__
from llmc.arch import ArchConfig
from llmc.checkpoint import TOKENIZER_FILES, WeightStore, read_json, short_repr
from llmc.errors import EngineError, GraphError, LlmcError
from llmc.io import atomic_directory, sha256_file, write_json_atomic
from llmc.ir import graph_from_dict, graph_to_dict, verify
from llmc.paths import check_regular, copy_model_file, resolve_inside
from llmc.targets import DEFAULT_TARGET, available_targets, get_target
from llmc.tokenizer import Tokenizer

SCHEMA_VERSION = 2            # 2: the target's `backend` section (device, kernel set, kernels by op)
ENGINE_FILE = "engine.json"
WEIGHTS_FILE = "weights.safetensors"
COPIED_FILES = TOKENIZER_FILES + ("config.json",)       # from the source model, when it has them
REQUIRED = {"architecture": dict, "graph": dict, "files": dict, "target": str, "backend": dict, "dtype": str}
OPTIONAL = {"passes": list, "quantization": dict}
SHA256 = re.compile(r"[0-9a-f]{64}")


def write_weights(model, directory: Path) -> None:
    """weights.safetensors: every weight the graph reads, quantized ones packed, float ones in the
    model's compute dtype; a quantized model's per-weight formats go to the manifest (see write_engine)."""
    from llmc.quantized.formats import QuantizedWeight
    tensors = {}
    for name in model.graph.weight_names():
        t = model.weights.get(name)
        if isinstance(t, QuantizedWeight):                     # stays packed
            tensors.update({k: v.contiguous() for k, v in t.tensors(name).items()})
        else:
            tensors[name] = (t.to(model.dtype) if t.is_floating_point() else t).contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "producer": f"llmc {__version__}"})


def _quantization_section(model) -> dict[str, Any] | None:
    """The manifest's quantization section: the recipe and provenance, and every quantized weight's
    format and logical shape (headers only; nothing is dequantized)."""
    from llmc.quantized.store import QuantizedEntry, manifest_section
    fmt_of = getattr(model.weights, "quantized_format", None)
    if fmt_of is None:
        return None
    entries = {}
    for name in model.graph.weight_names():
        f = fmt_of(name)
        if f is not None:
            entries[name] = QuantizedEntry(f[0], tuple(model.weights.shape(name)), f[1])
    return manifest_section(entries, **(model.quantization or {})) if entries else None


def write_engine(model, out: Path, target: str, overwrite: bool = False, inputs: tuple | list = ()) -> dict[str, Any]:
    """Lower `model` for `target` into an engine directory at `out` (atomically); returns the manifest."""
    from llmc.model import DTYPES
    tgt = get_target(target)
    dtype_name = {v: k for k, v in DTYPES.items()}[model.dtype]
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        backend = tgt.lower(model, tmp)
        for name in COPIED_FILES:
            copy_model_file(model.path, name, tmp)
        files = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                 for f in sorted(tmp.iterdir()) if f.is_file()}
        quantization = _quantization_section(model)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "llmc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": tgt.name,
            "backend": backend,
            "dtype": dtype_name,
            "architecture": model.arch.to_dict(),
            "source": {"path": str(model.path), "kind": model.kind},
            "tokenizer": asdict(model.tokenizer.info),
            "passes": [asdict(r) for r in model.passes],
            "graph": graph_to_dict(model.graph),
            **({"quantization": quantization} if quantization else {}),
            "files": files,
        }
        write_json_atomic(tmp / ENGINE_FILE, manifest)
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """engine.json, its schema version and the type of every field llmc reads checked."""
    where = path / ENGINE_FILE
    try:
        manifest = read_json(resolve_inside(path, ENGINE_FILE, "llmc"), "engine manifest")
    except LlmcError as e:
        raise EngineError(e.message, hint=e.hint) from None
    version = manifest.get("schema_version")
    if type(version) is int and 1 <= version < SCHEMA_VERSION:
        source = manifest.get("source", {}).get("path") if isinstance(manifest.get("source"), dict) else None
        how = f"llmc compile {source} -o {path} --force" if isinstance(source, str) else "llmc compile"
        raise EngineError(f"{where}: this engine was built by an older llmc (engine schema {version}; this llmc "
                          f"reads {SCHEMA_VERSION}); rebuild it", hint=how)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise EngineError(f"{where}: engine schema version {short_repr(version)} is not {SCHEMA_VERSION}",
                          hint="rebuild the engine with this llmc version (llmc compile)")
    for key in REQUIRED:
        if key not in manifest:
            raise EngineError(f"{where}: the manifest lacks {key!r}")
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if (key in REQUIRED or manifest.get(key) is not None) and not isinstance(manifest[key], kind):
            raise EngineError(f"{where}: {key} is {short_repr(manifest[key])}, not a JSON {_JSON_TYPE[kind]}")
    _check_graph_json(manifest["graph"], where)
    return manifest


_JSON_TYPE = {dict: "object", list: "array", str: "string"}
ATTR_TYPES = (str, int, float, type(None))          # graph_to_dict writes scalar attributes only


def _check_graph_json(g: dict[str, Any], where: Path) -> None:
    """The graph section has the JSON types graph_from_dict expects (the op schemas, value names and
    shapes are then checked by `verify`)."""
    def names(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(v, str) for v in x)
    problem = next((k for k in ("inputs", "outputs") if not names(g.get(k))), None)
    if problem is None and not isinstance(g.get("nodes"), list):
        problem = "nodes"
    for i, n in enumerate(g.get("nodes") if problem is None else ()):
        if not (isinstance(n, dict) and isinstance(n.get("op"), str) and names(n.get("inputs"))
                and names(n.get("outputs")) and isinstance(n.get("attrs"), dict)
                and all(isinstance(v, ATTR_TYPES) for v in n["attrs"].values())):
            problem = f"nodes[{i}]"
            break
    if problem is not None:
        raise EngineError(f"{where}: graph.{problem} is malformed (not as llmc writes it)",
                          hint="recompile the engine")


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file engine.json lists is a regular file inside the engine, of the listed size and
    sha256; every file llmc reads from the engine is listed (nothing was added after compiling)."""
    where, files = path / ENGINE_FILE, manifest["files"]
    if WEIGHTS_FILE not in files:
        raise EngineError(f"{where}: lists no {WEIGHTS_FILE}")
    for name in COPIED_FILES:
        if name not in files and os.path.lexists(path / name):
            raise EngineError(f"{path / name}: not listed in {ENGINE_FILE} (added after compiling?)",
                              hint="recompile the engine instead of adding files to it")
    for name, meta in files.items():
        if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and meta["bytes"] >= 0
                and isinstance(meta.get("sha256"), str) and SHA256.fullmatch(meta["sha256"])):
            raise EngineError(f"{where}: files[{short_repr(name)}] is {short_repr(meta)}, not "
                              "{bytes: size, sha256: 64 hex digits}")
        f = resolve_inside(path, name, ENGINE_FILE, EngineError)
        if name == ENGINE_FILE:
            raise EngineError(f"{where}: lists itself among its files")
        if not os.path.lexists(f):
            raise EngineError(f"{f}: missing from the engine")
        size = check_regular(f, "an engine file", EngineError).st_size
        if size != meta["bytes"]:
            what = "truncated" if size < meta["bytes"] else "altered"
            raise EngineError(f"{f}: {what} ({size} bytes, engine.json says {meta['bytes']})")
        try:
            digest = sha256_file(f)
        except OSError as e:
            raise EngineError(f"{f}: cannot be read ({e.strerror or e})") from None
        if digest != meta["sha256"]:
            raise EngineError(f"{f}: altered (sha256 differs from engine.json)")


def check_target(path: Path, manifest: dict[str, Any]) -> None:
    """The engine was built for a target this llmc runs."""
    targets = available_targets()
    if manifest["target"] not in targets:
        raise EngineError(f"{path / ENGINE_FILE}: target {short_repr(manifest['target'])} cannot run here "
                          f"(this llmc runs {', '.join(targets)} engines)",
                          hint=f"recompile it with --target {DEFAULT_TARGET}")


RUNTIME_INPUTS = ("tokens", "positions")              # what the executor feeds a graph


def check_graph(path: Path, graph, arch: ArchConfig, store) -> None:
    """The graph follows the op schemas and fits the weights' shapes; it takes the runtime's inputs,
    ends in one logits value, and agrees with the architecture the runtime sizes its KV cache and
    sampler by (layers, KV heads, head size, vocabulary)."""
    try:
        verify(graph)                                   # op names and schemas, before weight_names() uses them
        shapes = verify(graph, {w: store.shape(w) for w in graph.weight_names() if w in store})
    except GraphError as e:
        raise EngineError(f"{path}: graph and weights disagree ({e})") from None
    except ArithmeticError as e:                        # a shape rule dividing by a zero attribute (rope head_dim)
        raise EngineError(f"{path / ENGINE_FILE}: the graph has an impossible attribute ({e})") from None
    producer = {o: n for n in graph.nodes for o in n.outputs}
    out = producer.get(graph.outputs[0]) if len(graph.outputs) == 1 else None
    attention = [n for n in graph.nodes if n.op == "attention"]
    embed_rows = {store.shape(n.inputs[1])[0] for n in graph.nodes if n.op == "embed"}
    problems = [
        (not set(graph.inputs) <= set(RUNTIME_INPUTS), f"inputs {list(graph.inputs)} are not among {RUNTIME_INPUTS}"),
        (out is None or out.op != "logits", f"outputs {list(graph.outputs)} are not one logits value"),
    ]
    if out is not None and out.op == "logits":
        problems += [
            (shapes[graph.outputs[0]][-1] != arch.vocab_size or embed_rows != {arch.vocab_size},
             f"its vocabulary (logits {shapes[graph.outputs[0]][-1]}, embeddings {sorted(embed_rows)}) is not "
             f"vocab_size {arch.vocab_size}"),
            (shapes[out.inputs[0]][-1] != arch.hidden_size, f"its hidden size is not {arch.hidden_size}"),
            (len(attention) != arch.num_layers or sorted(n.attr("layer") for n in attention) != list(
                range(len(attention))), f"its attention layers are not 0..{arch.num_layers - 1}"),
            (any((n.attr("num_kv_heads"), n.attr("head_dim")) != (arch.num_kv_heads, arch.head_dim)
                 for n in attention), f"its attention is not {arch.num_kv_heads} KV heads of {arch.head_dim}"),
        ]
    problem = next((why for bad, why in problems if bad), None)
    if problem is not None:
        raise EngineError(f"{path / ENGINE_FILE}: the graph does not fit the architecture: {problem}")


def load_engine(path: Path):
    from llmc.model import DTYPES, Model, check_weight_types, kv_cache_format, quantization_summary
    from llmc.passes import PassRecord

    where = path / ENGINE_FILE
    manifest = read_manifest(path)
    check_target(path, manifest)
    if manifest["dtype"] not in DTYPES:
        raise EngineError(f"{where}: unknown dtype {short_repr(manifest['dtype'])}")
    check_files(path, manifest)
    try:
        arch = ArchConfig.from_dict(manifest["architecture"])
        graph = graph_from_dict(manifest["graph"])
        passes = [PassRecord(**r) for r in manifest.get("passes") or []]
    except (LlmcError, GraphError, TypeError, KeyError) as e:
        raise EngineError(f"{where}: malformed ({e})") from None
    quantization = manifest.get("quantization")
    try:
        store = WeightStore.open_files(path, [WEIGHTS_FILE])
        if quantization is not None:
            from llmc.quantized.store import QuantizedStore, entries_from_manifest
            store = QuantizedStore(store, entries_from_manifest(quantization, str(where)))
        kv_cache_format(quantization, str(where))
    except LlmcError as e:
        raise EngineError(e.message, hint=e.hint) from None
    check_graph(path, graph, arch, store)
    check_weight_types(graph, store, EngineError)
    return Model(path=path, kind="engine", arch=arch, graph=graph, weights=store, tokenizer=Tokenizer(path),
                 dtype=DTYPES[manifest["dtype"]], passes=passes, manifest=manifest,
                 quantization=quantization_summary(quantization))
