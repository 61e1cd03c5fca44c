"""The onnx target: `compile --target onnx` writes the graph as an ONNX model of standard ops
(llmc.backends.onnx_graph) beside the engine's weights, and llmc runs it with ONNX Runtime.

`model.onnx` holds the graph and `model.onnx.data` its initializers (ONNX external data); the
manifest's checksums cover both. The runtime's paged KV cache stays the source of truth: each step,
every sequence's past keys and values are gathered from its blocks into the `past_key_values` inputs,
the session runs its new tokens, and the new rows of `present` are written back to their slots. So
the scheduler, prefix caching and preemption work unchanged. Sequences with the same number of new
tokens (all of a step's decodes) share one session call, their pasts left-padded and masked. An
int8 or fp8 cache is passed as it is stored (fp8 as raw bytes in an OrtValue of its type).

ONNX Runtime fuses DequantizeLinear + MatMul into its MatMulNBits kernel; accuracy level 1 keeps
the activations fp32 there, which is each scheme's definition (level 4, ORT's default and what ONNX
Runtime GenAI runs, quantizes them to int8 as well).
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.backends.onnx_genai import GENAI_CONFIG, genai_config
from llmc.errors import ConfigError
from llmc.kernels.reference import kv_quant
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from llmc.targets import Target, register_target

NAME = "onnx"
ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")   # preferred first
KV_STATE = (torch.int8, torch.float8_e4m3fn)   # cache dtypes kept as they are; 16-bit caches are fp32 state


def _require():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"the onnx target needs the onnx extra ({e.name} is missing)",
                          hint="pip install 'llmc[onnx]'") from None
    return onnx, onnxruntime


def write_onnx(model, directory: Path) -> Path:
    """The graph lowered to ONNX: model.onnx, with its initializers in model.onnx.data (small constants,
    shapes and axes, stay inline). The tensorrt target builds its plan from the same files."""
    from llmc.backends.onnx_graph import lower_to_onnx
    onnx, _ = _require()
    path = directory / ONNX_FILE
    onnx.save_model(lower_to_onnx(model), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_DATA, size_threshold=1024)
    return path


def lower(model, directory: Path) -> dict[str, Any]:
    """The engine's weights, and the graph as model.onnx with its initializers in model.onnx.data."""
    from llmc.backends.onnx_graph import OPSET
    from llmc.engine import write_weights
    _, ort = _require()
    write_onnx(model, directory)
    write_weights(model, directory)                 # the engine's model (graph, arch, weights) loads as any
    (directory / GENAI_CONFIG).write_text(json.dumps(genai_config(model), indent=2) + "\n")
    return {"device": "cpu", "kernels": "onnxruntime", "ops": {n.op: "onnxruntime" for n in model.graph.nodes},
            "artifact": ONNX_FILE, "opset": OPSET, "onnxruntime": ort.__version__, "genai_config": GENAI_CONFIG,
            "requires": f"onnxruntime (the onnx extra; compiled with {ort.__version__}): its CPU provider, or its "
                        "TensorRT / CUDA providers where installed; or ONNX Runtime GenAI"}


def describe(engine: Path) -> str:
    """model.onnx in ONNX's textual syntax; initializers in the external data file appear by reference."""
    onnx, _ = _require()
    import onnx.printer
    return onnx.printer.to_text(onnx.load(str(engine / ONNX_FILE), load_external_data=False).graph) + "\n"


def load(model, runtime):
    return OnnxBackend(model)


class OnnxBackend:
    target = NAME
    kernels = "onnxruntime"

    def __init__(self, model) -> None:
        _, ort = _require()
        self._ort = ort
        if model.kind != "engine" or not (Path(model.path) / ONNX_FILE).is_file():
            raise ConfigError(f"{model.path}: not an onnx engine", hint="compile it with --target onnx")
        a = model.arch
        self.arch, self.device = a, torch.device("cpu")
        self.kv_spec = KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim, model.kv_dtype if model.kv_dtype in KV_STATE else torch.float32)
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        so.intra_op_num_threads = torch.get_num_threads()
        available = ort.get_available_providers()
        self.session = ort.InferenceSession(str(Path(model.path) / ONNX_FILE), so,
                                            providers=[p for p in PROVIDERS if p in available])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.calls = 0

    def allocate_kv(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.kv_spec, num_blocks, block_size, self.device)

    def forward(self, batch, kv: PagedKVCache) -> torch.Tensor:
        """One session call per group of sequences with the same number of new tokens (every decode
        of a step is one group), their pasts left-padded to the longest; the new keys and values of
        each sequence go back to its slots."""
        starts = [0]
        for n in batch.query_lens:
            starts.append(starts[-1] + n)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(batch.query_lens):
            groups.setdefault(n, []).append(i)
        rows: list[torch.Tensor | None] = [None] * batch.num_seqs
        for n, members in groups.items():
            logits = self._run(batch, kv, n, members, starts)                  # [B, n, vocab]
            for r, i in enumerate(members):
                rows[i] = logits[r] if batch.all_logits else logits[r, -1:]
        return torch.cat(rows)

    def _run(self, batch, kv: PagedKVCache, n: int, members: list[int], starts: list[int]) -> torch.Tensor:
        a, bs = self.arch, kv.block_size
        pasts = [batch.context_lens[i] - n for i in members]
        width, count = max(pasts), len(members)
        mask = np.zeros((count, width + n), np.int64)
        gather = torch.zeros(count, width, dtype=torch.long)          # slot of each past position (padding: 0)
        for r, (i, past) in enumerate(zip(members, pasts)):
            mask[r, width - past:] = 1
            pos = torch.arange(past)
            gather[r, width - past:] = torch.tensor(batch.block_tables[i], dtype=torch.long)[pos // bs] * bs + pos % bs
        padding = torch.from_numpy(mask[:, :width] == 0)
        feed = {"input_ids": np.array([batch.token_ids[starts[i]:starts[i] + n] for i in members], np.int64),
                "attention_mask": mask,
                "position_ids": np.array([np.arange(p, p + n) for p in pasts], np.int64)}
        feed = {k: self._ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
        for layer in range(a.num_layers):
            for part, cache in (("key", kv.k[layer]), ("value", kv.v[layer])):
                flat = kv_quant.as_bytes(cache).view(-1, a.num_kv_heads, a.head_dim)
                past = flat[gather.reshape(-1)].view(count, width, a.num_kv_heads, a.head_dim)
                past[padding] = 0                                       # padded keys: zeros, never NaN
                feed[f"past_key_values.{layer}.{part}"] = self._to_ort(past.permute(0, 2, 1, 3), cache.dtype)
        out = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feed)))
        self.calls += 1
        slots = torch.cat([batch.slot_mapping[starts[i]:starts[i] + n] for i in members]).cpu()
        for layer in range(a.num_layers):
            for part, cache in (("key", kv.k[layer]), ("value", kv.v[layer])):
                present = self._from_ort(out[f"present.{layer}.{part}"], cache.dtype)   # [B, KV, T, d]
                new = present[:, :, width:].permute(0, 2, 1, 3).reshape(-1, a.num_kv_heads, a.head_dim)
                flat = kv_quant.as_bytes(cache).view(-1, a.num_kv_heads, a.head_dim)
                flat[slots] = kv_quant.as_bytes(new.to(cache.dtype))
        return torch.from_numpy(out["logits"].numpy())

    def _to_ort(self, t: torch.Tensor, dtype: torch.dtype):
        """A tensor of the cache's bytes as an OrtValue of the state's type (fp8 has no numpy dtype:
        its bytes are copied into an OrtValue of type FLOAT8E4M3FN)."""
        t = t.contiguous()
        if dtype != torch.float8_e4m3fn:
            return self._ort.OrtValue.ortvalue_from_numpy(t.view(dtype).numpy())
        from onnx import TensorProto
        v = self._ort.OrtValue.ortvalue_from_shape_and_type(list(t.shape), TensorProto.FLOAT8E4M3FN, "cpu", 0)
        ctypes.memmove(v.data_ptr(), t.data_ptr(), t.numel())
        return v

    @staticmethod
    def _from_ort(v, dtype: torch.dtype) -> torch.Tensor:
        if dtype != torch.float8_e4m3fn:
            return torch.from_numpy(v.numpy())
        t = torch.empty(v.shape(), dtype=torch.uint8)
        ctypes.memmove(t.data_ptr(), v.data_ptr(), t.numel())
        return t.view(torch.float8_e4m3fn)

    def report(self) -> dict[str, Any]:
        return {"target": NAME, "device": "cpu", "kernels": self.kernels,
                "providers": self.session.get_providers(), "session_calls": self.calls}


register_target(Target(NAME, "ONNX standard ops (quantized weights through DequantizeLinear), run by ONNX Runtime",
                       devices=("cpu",), kernel_sets=("onnxruntime",), lower=lower, load=load,
                       describe=describe))
