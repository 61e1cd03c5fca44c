"""The engine format: a directory holding

- `engine.json`: schema version, llmc version, architecture config, target, compute dtype, the
  optimised graph, the passes log, tokenizer info and the sha256 and size of every other file;
- `weights.safetensors`: every weight the graph reads (never pickle);
- the tokenizer files of the source checkpoint.

It is written atomically (temporary directory + rename). Loading checks the schema, then the size
and sha256 of every listed file, and names the file that is missing, truncated or altered.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from llmc import __version__
from llmc.arch import ArchConfig
from llmc.checkpoint import WeightStore, read_json
from llmc.errors import EngineError, GraphError, LlmcError
from llmc.io import atomic_directory, sha256_file, write_json_atomic
from llmc.ir import graph_from_dict, graph_to_dict, verify
from llmc.tokenizer import TOKENIZER_FILES, Tokenizer

SCHEMA_VERSION = 1
ENGINE_FILE = "engine.json"
WEIGHTS_FILE = "weights.safetensors"


def write_engine(model, out: Path, target: str, extra: dict[str, Any] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write `model` (graph + the weights it reads) as an engine directory; returns the manifest."""
    from llmc.model import DTYPES
    dtype_name = {v: k for k, v in DTYPES.items()}[model.dtype]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        from llmc.passes.quant.formats import QuantizedWeight
        from llmc.passes.quant.store import QuantizedEntry, manifest_section
        tensors, entries = {}, {}
        for name in model.graph.weight_names():
            t = model.weights.get(name)
            if isinstance(t, QuantizedWeight):                     # stays packed
                tensors.update({k: v.contiguous() for k, v in t.tensors(name).items()})
                entries[name] = QuantizedEntry.of(t)
            else:
                tensors[name] = (t.to(model.dtype) if t.is_floating_point() else t).contiguous()
        if entries:
            extra = {**(extra or {}), "quantization": manifest_section(entries, **(model.quantization or {}))}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": f"llmc {__version__}"})
        del tensors
        for name in TOKENIZER_FILES + ("config.json",):
            src = model.path / name
            if src.exists():
                shutil.copyfile(src, tmp / name)
        files = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                 for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "llmc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": target,
            "dtype": dtype_name,
            "architecture": model.arch.to_dict(),
            "source": {"path": str(model.path), "kind": model.kind},
            "tokenizer": asdict(model.tokenizer.info),
            "passes": [asdict(r) for r in model.passes],
            "graph": graph_to_dict(model.graph),
            **(extra or {}),
            "files": files,
        }
        write_json_atomic(tmp / ENGINE_FILE, manifest)
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = read_json(path / ENGINE_FILE, "engine manifest")
    except LlmcError as e:
        raise EngineError(e.message) from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EngineError(f"{path / ENGINE_FILE}: engine schema version {version!r} is not {SCHEMA_VERSION}",
                          hint="recompile the engine with this llmc version")
    for key in ("architecture", "graph", "files", "target", "dtype"):
        if key not in manifest:
            raise EngineError(f"{path / ENGINE_FILE}: the manifest lacks {key!r}")
    return manifest


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    if WEIGHTS_FILE not in files:
        raise EngineError(f"{path / ENGINE_FILE}: lists no {WEIGHTS_FILE}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise EngineError(f"{f}: missing from the engine")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            what = "truncated" if size < meta.get("bytes", 0) else "altered"
            raise EngineError(f"{f}: {what} ({size} bytes, engine.json says {meta.get('bytes')})")
        if sha256_file(f) != meta.get("sha256"):
            raise EngineError(f"{f}: altered (sha256 differs from engine.json)")


def load_engine(path: Path):
    from llmc.model import DTYPES, Model, _summary
    from llmc.passes import PassRecord

    manifest = read_manifest(path)
    check_files(path, manifest)
    try:
        arch = ArchConfig.from_dict(manifest["architecture"])
        graph = graph_from_dict(manifest["graph"])
    except (LlmcError, GraphError, TypeError, KeyError) as e:
        raise EngineError(f"{path / ENGINE_FILE}: malformed ({e})") from None
    store = WeightStore.open_files(path, [path / WEIGHTS_FILE])
    quantization = manifest.get("quantization")
    if quantization is not None:
        from llmc.passes.quant.store import QuantizedStore, entries_from_manifest
        store = QuantizedStore(store, entries_from_manifest(quantization, str(path / ENGINE_FILE)))
    try:
        verify(graph, {w: store.shape(w) for w in graph.weight_names() if w in store})
    except GraphError as e:
        raise EngineError(f"{path}: graph and weights disagree ({e})") from None
    if manifest["dtype"] not in DTYPES:
        raise EngineError(f"{path / ENGINE_FILE}: unknown dtype {manifest['dtype']!r}")
    return Model(path=path, kind="engine", arch=arch, graph=graph, weights=store, tokenizer=Tokenizer(path),
                 dtype=DTYPES[manifest["dtype"]], passes=[PassRecord(**r) for r in manifest.get("passes", [])],
                 manifest=manifest, quantization=_summary(quantization))
