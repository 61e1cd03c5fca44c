"""`inspect`: what a checkpoint or engine holds, without running it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.errors import LlmcError, ModelFormatError
from llmc.paths import bytes_on_disk
from llmc.quantized.scheme import QuantRecipe


@dataclass(frozen=True)
class InspectReport:
    path: str
    kind: str                      # "hf" checkpoint or "engine"
    architecture: str
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    parameters: int
    dtype: str                     # storage dtype of the weights (most common one)
    compute_dtype: str
    bytes_on_disk: int
    kv_cache_bytes_per_token: int
    kv_cache_dtype: str
    rope: dict[str, Any]
    tie_word_embeddings: bool
    sliding_window: int | None
    target: str | None
    kernels: str | None            # the kernel set (or runtime) the engine runs with
    artifact: str | None           # the file the target runs from (weights.safetensors, model.onnx, model.plan)
    requires: str | None           # what running it needs (provider, GPU, versions), as its target recorded it
    graph_nodes: int
    ops: dict[str, int]
    quantization: str | None       # e.g. "w4a16 rtn (int4/group, g128)"
    recipe: dict[str, Any] | None


def inspect(path: Path | str, model=None) -> InspectReport:
    """The report of the checkpoint or engine at `path`; `model` (already loaded from it) skips loading."""
    from llmc.engine import ENGINE_FILE
    from llmc.loader import load_model
    from llmc.runtime.kv_cache import KVCacheSpec

    m = model or load_model(path)
    a = m.arch
    names = m.graph.weight_names()
    params = 0
    for w in names:
        n = 1
        for d in m.weights.shape(w):
            n *= d
        params += n
    dtypes = Counter(m.weights.dtype(w) for w in names)        # the most common storage format
    root = Path(path)
    windows = {w for w in a.sliding_windows if w is not None}
    backend = (m.manifest or {}).get("backend", {})
    return InspectReport(
        path=str(root), kind=m.kind, architecture=a.model_type, layers=a.num_layers, hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size, heads=a.num_heads, kv_heads=a.num_kv_heads, head_dim=a.head_dim,
        vocab_size=a.vocab_size, max_position_embeddings=a.max_position_embeddings, parameters=params,
        dtype=dtypes.most_common(1)[0][0], compute_dtype=str(m.dtype).removeprefix("torch."),
        bytes_on_disk=bytes_on_disk(root),
        kv_cache_bytes_per_token=KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim, m.kv_dtype).bytes_per_token,
        kv_cache_dtype=str(m.kv_dtype).removeprefix("torch."),
        rope=a.to_dict()["rope"], tie_word_embeddings=a.tie_word_embeddings,
        sliding_window=max(windows) if windows else None,
        target=(m.manifest or {}).get("target"), kernels=backend.get("kernels"), artifact=backend.get("artifact"),
        requires=backend.get("requires"), graph_nodes=len(m.graph.nodes),
        ops=dict(Counter(n.op for n in m.graph.nodes)),
        quantization=_describe(m.quantization, root / (ENGINE_FILE if m.kind == "engine" else "config.json"),
                               _formats(m, names)),
        recipe=(m.quantization or {}).get("recipe"),
    )


def _formats(m, names) -> Counter:
    """How many quantized weights the model holds in each format (float ones are not counted)."""
    from llmc.passes.quant.sensitivity import format_label
    fmt_of = getattr(m.weights, "quantized_format", None)
    found = [fmt_of(n) for n in names] if fmt_of is not None else []
    return Counter(format_label(f[0]) for f in found if f is not None)


def _describe(q: dict[str, Any] | None, where: Path, counts: Counter | None = None) -> str | None:
    """One line for the model's quantization recipe (QuantRecipe.from_dict checks it); `counts`, the
    quantized weights per format, for a mixed-precision one."""
    if not q or "recipe" not in q:
        return None
    try:
        r = QuantRecipe.from_dict(q["recipe"])
    except LlmcError as e:
        raise ModelFormatError(f"{where}: {e.message}") from None
    w, act, kv = r.scheme.weight, r.scheme.activation, r.kv_cache
    if r.mixed:                              # each weight its own format: say which, and how many
        plan = q.get("mixed_precision") if isinstance(q.get("mixed_precision"), dict) else {}
        bpw = plan.get("bits_per_weight")
        formats = ", ".join(f"{label} x{n}" for label, n in (counts or Counter()).most_common())
        kv_note = f"; KV cache {kv.dtype}" if kv else ""
        return (f"{r.scheme.name} {r.algorithm}, mixed precision"
                f"{f' at {bpw:g} bits per weight' if isinstance(bpw, (int, float)) else ''} ({formats}{kv_note})")
    group = f", g{w.group_size}" if w.group_size else ""
    sym = ("" if w.symmetric else " asym") + (f", {w.scale_bits}-bit two-level scales" if w.two_level else "")
    extra = f"; inputs {act.dtype}/{act.granularity}" if act else ""
    extra += f"; KV cache {kv.dtype}" if kv else ""
    emulated = ", emulated on CPU" if "fp8_e4m3" in (w.dtype, act and act.dtype, kv and kv.dtype) else ""
    return f"{r.scheme.name} {r.algorithm} ({w.dtype}/{w.granularity}{group}{sym}{extra}{emulated})"
