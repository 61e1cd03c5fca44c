"""The onnx target: `compile --target onnx` writes the graph as an ONNX model of standard ops
(llmc.backends.onnx_graph) beside the engine's weights, and llmc runs it with ONNX Runtime.

`model.onnx` holds the graph and `model.onnx.data` its initializers (ONNX external data); the
manifest's checksums cover both. The runtime's paged KV cache stays the source of truth: each step,
every sequence's past keys and values are gathered from its blocks into the `past_key_values` inputs,
the session runs its new tokens, and the new rows of `present` are written back to their slots. So
the scheduler, prefix caching and preemption work unchanged; sequences run one session call each.

ONNX Runtime fuses DequantizeLinear + MatMul into its MatMulNBits kernel; accuracy level 1 keeps
the activations fp32 there, which is each scheme's definition (level 4 would quantize them to int8).
Its QDQPropagationTransformer is disabled: on the quantized-KV graph it makes an invalid node.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmc.errors import ConfigError, UnsupportedModelError
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from llmc.targets import Target, register_target

NAME = "onnx"
ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
KV_STATE = {torch.int8: torch.int8}            # the cache dtypes kept as they are; the rest is fp32 state


def _require():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"the onnx target needs the onnx extra ({e.name} is missing)",
                          hint="pip install 'llmc[onnx]'") from None
    return onnx, onnxruntime


def lower(model, directory: Path) -> dict[str, Any]:
    """The engine's weights, and the graph as model.onnx with its initializers in model.onnx.data."""
    from llmc.backends.onnx_graph import OPSET, lower_to_onnx
    from llmc.engine import write_weights
    onnx, ort = _require()
    if model.kv_dtype == torch.float8_e4m3fn:
        raise UnsupportedModelError("the onnx target does not run an fp8 KV cache yet")
    proto = lower_to_onnx(model)
    write_weights(model, directory)                 # the engine's model (graph, arch, weights) loads as any
    onnx.save_model(proto, str(directory / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_DATA, size_threshold=1024)   # small constants (shapes, axes) stay inline
    return {"device": "cpu", "kernels": "onnxruntime", "ops": {n.op: "onnxruntime" for n in model.graph.nodes},
            "artifact": ONNX_FILE, "opset": OPSET, "onnxruntime": ort.__version__}


def load(model, runtime):
    return OnnxBackend(model)


class OnnxBackend:
    target = NAME
    kernels = "onnxruntime"

    def __init__(self, model) -> None:
        _, ort = _require()
        if model.kind != "engine" or not (Path(model.path) / ONNX_FILE).is_file():
            raise ConfigError(f"{model.path}: not an onnx engine", hint="compile it with --target onnx")
        a = model.arch
        self.arch, self.device = a, torch.device("cpu")
        self.kv_spec = KVCacheSpec(a.num_layers, a.num_kv_heads, a.head_dim, KV_STATE.get(model.kv_dtype, torch.float32))
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        so.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(Path(model.path) / ONNX_FILE), so, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["QDQPropagationTransformer"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.calls = 0

    def allocate_kv(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.kv_spec, num_blocks, block_size, self.device)

    def forward(self, batch, kv: PagedKVCache) -> torch.Tensor:
        a, bs = self.arch, kv.block_size
        rows, at = [], 0
        for n, ctx, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            past = ctx - n
            blocks = torch.tensor(table, dtype=torch.long)
            feed = {"input_ids": np.array([batch.token_ids[at:at + n]], np.int64),
                    "attention_mask": np.ones((1, ctx), np.int64),
                    "position_ids": np.arange(past, ctx, dtype=np.int64)[None]}
            at += n
            for i in range(a.num_layers):
                for part, cache in (("key", kv.k[i]), ("value", kv.v[i])):
                    seq = cache[blocks].reshape(-1, a.num_kv_heads, a.head_dim)[:past]      # [past, KV, d]
                    feed[f"past_key_values.{i}.{part}"] = seq.permute(1, 0, 2)[None].contiguous().numpy()
            out = dict(zip(self.outputs, self.session.run(None, feed)))
            self.calls += 1
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past, ctx)], dtype=torch.long)
            for i in range(a.num_layers):
                for part, cache in (("key", kv.k[i]), ("value", kv.v[i])):
                    new = torch.from_numpy(out[f"present.{i}.{part}"][0, :, past:ctx]).permute(1, 0, 2)
                    cache.view(-1, a.num_kv_heads, a.head_dim)[slots] = new.to(cache.dtype)
            logits = torch.from_numpy(out["logits"][0])
            rows.append(logits if batch.all_logits else logits[-1:])
        return torch.cat(rows)

    def report(self) -> dict[str, Any]:
        return {"target": NAME, "device": "cpu", "kernels": self.kernels,
                "providers": self.session.get_providers(), "session_calls": self.calls}


register_target(Target(NAME, "ONNX standard ops (quantized weights through DequantizeLinear), run by ONNX Runtime",
                       devices=("cpu",), kernel_sets=("onnxruntime",), lower=lower, load=load))
