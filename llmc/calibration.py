"""Calibration: text -> token samples, and a runner that walks the decoder one layer at a time.

True sequential: layer i is calibrated on the hidden states that the already-quantized layers
0..i-1 produce, and only one layer's weights are in memory at a time. The runner executes each
layer as a subgraph of the (unfused) decoder graph with the cpu kernel set (torch's fused attention
and GEMMs: the values it captures are the reference's up to float rounding, and the reference's
attention took 17.5 of 21.5 s of an fp8 calibration), capturing the inputs of its linear layers.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from llmc.errors import ConfigError
from llmc.ir import Graph, Node
from llmc.paths import check_regular
from llmc.resources import default_calibration
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.executor import Executor
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache

CALIBRATION_KERNELS = "cpu"


@dataclass(frozen=True)
class CalibrationData:
    samples: list[list[int]]          # token ids, BOS first when the tokenizer has one
    provenance: dict                  # file, sha256, samples, seqlen, tokens, seed


def load_calibration(tokenizer, path: Path | None, samples: int, seqlen: int,
                     vocab_size: int | None = None, seed: int | None = None) -> CalibrationData:
    """`.txt`: the whole text tokenized and cut into consecutive windows of `seqlen` (BOS
    included); `.jsonl`: one sample per record's `text` field, truncated to `seqlen` (records
    without tokens are skipped). Without a seed: the first `samples` windows or records, as
    always. With one: the windows start at an offset drawn from the seed, below a window's width
    (the tokens before it are left out), and the samples are a random `samples` of the windows or
    records, in random order (all of them, shuffled, if there are fewer). The draw depends only on
    the seed and the text (and the tokenizer); the provenance records the seed."""
    if samples < 1 or seqlen < 2:
        raise ConfigError(f"need at least 1 calibration sample of at least 2 tokens (got {samples} x {seqlen})")
    p = Path(path) if path is not None else default_calibration()
    if not p.exists():
        raise ConfigError(f"{p}: calibration file not found")
    check_regular(p, "calibration file", ConfigError)
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: calibration file is unreadable ({e})") from None
    tk = tokenizer._need()
    bos = tokenizer.info.bos_token_id
    head = [bos] if bos is not None else []
    width = seqlen - len(head)
    rng = random.Random(seed) if seed is not None else None
    out: list[list[int]] = []
    if p.suffix == ".jsonl":
        lines = [(i, line) for i, line in enumerate(text.splitlines()) if line.strip()]
        for i, line in (lines[j] for j in _order(len(lines), rng)):
            try:
                record = json.loads(line)
                body = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{p}:{i + 1}: each line must be a JSON object with a 'text' field") from None
            ids = tk.encode(str(body), add_special_tokens=False).ids[:width]
            if ids:
                out.append(head + ids)
            if len(out) == samples:
                break
    else:
        stream = tk.encode(text.replace("\r\n", "\n"), add_special_tokens=False).ids
        start = _below(rng, min(width, len(stream))) if rng is not None else 0
        windows = [stream[i:i + width] for i in range(start, len(stream), width)]     # none is empty
        out = [head + windows[j] for j in _order(len(windows), rng)[:samples]]
    if not out:
        raise ConfigError(f"{p}: calibration file is empty")
    top = max(max(s) for s in out)
    if vocab_size is not None and (top >= vocab_size or min(min(s) for s in out) < 0):
        raise ConfigError(f"{tokenizer.directory}: the tokenizer gives token id {top}, outside the model's "
                          f"vocabulary (vocab_size {vocab_size} in config.json)",
                          hint="the tokenizer does not belong to this model")
    return CalibrationData(out, {"file": str(p), "sha256": hashlib.sha256(raw).hexdigest(), "samples": len(out),
                                 "seqlen": seqlen, "tokens": sum(map(len, out)), "seed": seed})


def _below(rng: random.Random, n: int) -> int:
    """A number in [0, n) (0 for n = 0), from `rng.random()` alone: the one method whose sequence
    for a seed Python promises to keep, so a seeded draw stays the same across Python versions."""
    return int(rng.random() * n)


def _order(n: int, rng: random.Random | None) -> list[int]:
    """range(n) in order, or with `rng` shuffled (Fisher-Yates)."""
    order = list(range(n))
    if rng is not None:
        for i in range(n - 1, 0, -1):
            j = _below(rng, i + 1)
            order[i], order[j] = order[j], order[i]
    return order


def layer_nodes(graph: Graph, i: int) -> tuple[Node, ...]:
    """The nodes of decoder layer i of the unfused decoder graph (see llmc.decoder)."""
    return tuple(n for n in graph.nodes if any(o.startswith(f"l{i}.") or o == f"h{i + 1}" for o in n.outputs))


def layer_graph(graph: Graph, i: int) -> Graph:
    """Layer i as a graph of its own: h{i}, positions -> h{i+1}; its attention uses cache layer 0."""
    nodes = tuple(replace(n, attrs=tuple((k, 0 if k == "layer" else v) for k, v in n.attrs))
                  for n in layer_nodes(graph, i))
    return Graph(nodes=nodes, outputs=(f"h{i + 1}",), inputs=(f"h{i}", "positions"))


def tail_graph(graph: Graph, num_layers: int) -> Graph:
    """The final norm and the logits as a graph of their own: h{num_layers} -> logits."""
    h = f"h{num_layers}"
    nodes = tuple(n for n in graph.nodes if n.op == "logits" or (n.op == "rms_norm" and n.inputs[0] == h))
    return Graph(nodes=nodes, outputs=("logits",), inputs=(h,))


class LayerRunner:
    """Runs calibration samples through one decoder layer at a time, in chunks of samples."""

    def __init__(self, arch, graph: Graph, samples: list[list[int]], chunk_tokens: int = 2048) -> None:
        self.arch, self.graph, self.samples = arch, graph, samples
        self.chunks: list[list[list[int]]] = []
        cur: list[list[int]] = []
        for s in samples:
            if cur and sum(map(len, cur)) + len(s) > chunk_tokens:
                self.chunks.append(cur)
                cur = []
            cur.append(s)
        self.chunks.append(cur)
        self.spec = KVCacheSpec(1, arch.num_kv_heads, arch.head_dim)

    def _batch(self, chunk: list[list[int]], all_logits: bool = False) -> tuple[RaggedBatch, PagedKVCache]:
        bs, tables, nxt = 16, [], 0
        for s in chunk:
            n = -(-len(s) // bs)
            tables.append(list(range(nxt, nxt + n)))
            nxt += n
        batch = RaggedBatch(token_ids=[t for s in chunk for t in s], query_lens=[len(s) for s in chunk],
                            context_lens=[len(s) for s in chunk], block_tables=tables, block_size=bs,
                            all_logits=all_logits)
        return batch, PagedKVCache(self.spec, max(nxt, 1), bs)

    def embed(self, table: Tensor) -> list[Tensor]:
        """h0 of every chunk."""
        return [table.float()[torch.tensor([t for s in c for t in s])] for c in self.chunks]

    def run(self, i: int, hidden: list[Tensor], load_weight: Callable[[str], object],
            capture: tuple[str, ...] = ()) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """For each chunk: (h{i+1}, captured values) with the weights `load_weight` gives."""
        ex = Executor(layer_graph(self.graph, i), load_weight, kernels=CALIBRATION_KERNELS,
                      input_shapes={f"h{i}": ("T", self.arch.hidden_size)})
        for chunk, h in zip(self.chunks, hidden):
            batch, kv = self._batch(chunk)
            out = ex.run(batch, kv, inputs={f"h{i}": h}, capture=capture)
            h_next = out.pop(f"h{i + 1}")
            yield h_next, out
            del out, h_next                 # before the next chunk runs: its captures are the peak

    def logits(self, hidden: list[Tensor], load_weight: Callable[[str], object]) -> Iterator[Tensor]:
        """For each chunk: the logits of every token, from the states the last layer gives."""
        h_last = f"h{self.arch.num_layers}"
        ex = Executor(tail_graph(self.graph, self.arch.num_layers), load_weight, kernels=CALIBRATION_KERNELS,
                      input_shapes={h_last: ("T", self.arch.hidden_size)})
        for chunk, h in zip(self.chunks, hidden):
            batch, kv = self._batch(chunk, all_logits=True)
            yield ex.run(batch, kv, inputs={h_last: h})["logits"]
