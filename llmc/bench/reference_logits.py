"""A reference model's logits, saved once so later quality runs need not run it.

`llmc bench quality MODEL --reference REF --text T --save-reference FILE` keeps, for every scored
position, the reference's top-k log-probabilities and their token ids, and the log-probability of
the token that came next (so the reference's perplexity stays exact); `--reference-logits FILE`
later scores a model against them. The full distribution over a vocabulary of 32,000 is ~1,000
times the size of its top 32, and the top 32 carry nearly all of the mass: KL divergence is taken
over the top-k and the rest of the mass as one outcome (the KL of the coarsened distributions, a
lower bound of the full KL; with k = the vocabulary size it is the full KL).

The file is safetensors: `ids` (int32, the windows' token ids one after another), `window_lens`
and `scored_lens` (int32: each window's tokens, and how many of its predictions are scored),
`topk_ids` (int32, scored positions x k), `topk_logprobs` and `target_logprobs` (float32), and in
its metadata the schema, the reference's identity and the protocol (windows, text checksum, seqlen,
max_tokens) a run must share to use it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmc.errors import ConfigError

SCHEMA = "llmc.reference-logits/1"
MATCHED = ("protocol", "text_sha256", "seqlen", "max_tokens")     # what a run must share with the run that saved them
TINY = 1e-30


def kl_protocol(k: int) -> str:
    return f"top{k}+tail"


class ReferenceLogits:
    """Collects the reference's top-k per scored position, window by window, then saves them."""

    def __init__(self, top_k: int) -> None:
        self.k = top_k
        self.ids: list[torch.Tensor] = []
        self.topk_ids: list[torch.Tensor] = []
        self.topk_lp: list[torch.Tensor] = []
        self.target_lp: list[torch.Tensor] = []
        self.scored: list[int] = []

    @property
    def kl_protocol(self) -> str:
        return kl_protocol(self.k)

    def add(self, ids: list[int], logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        """One window: its token ids, the reference's log-probabilities of ids[1:] (positions x vocab)."""
        k = min(self.k, logprobs.shape[-1])
        values, index = logprobs.float().topk(k, dim=-1)
        self.ids.append(torch.tensor(ids, dtype=torch.int32))
        self.topk_ids.append(index.to(torch.int32))
        self.topk_lp.append(values)
        self.target_lp.append(logprobs[torch.arange(len(targets)), targets].float())
        self.scored.append(len(targets))

    def save(self, path: Path | str, protocol: dict[str, Any], reference: dict[str, Any], vocab_size: int,
             text_file: str) -> None:
        from safetensors.torch import save

        from llmc.io import check_output, write_bytes_atomic

        p = Path(path)
        check_output(p, [text_file, reference.get("path")], force=True, directory=False, what="reference logits")
        tensors = {"ids": torch.cat(self.ids), "window_lens": torch.tensor([len(i) for i in self.ids], dtype=torch.int32),
                   "scored_lens": torch.tensor(self.scored, dtype=torch.int32),
                   "topk_ids": torch.cat(self.topk_ids), "topk_logprobs": torch.cat(self.topk_lp),
                   "target_logprobs": torch.cat(self.target_lp)}
        from llmc.io import producer_stamp
        meta = {"producer": producer_stamp(), "schema": SCHEMA, "k": str(self.k), "vocab_size": str(vocab_size), "protocol": json.dumps(protocol),
                "reference": json.dumps(reference), "text": text_file}
        write_bytes_atomic(p, save(tensors, metadata=meta))


@dataclass(frozen=True)
class SavedReference:
    path: Path
    k: int
    vocab_size: int
    protocol: dict[str, Any]
    reference: dict[str, Any]
    windows: int
    ids: list[torch.Tensor]          # per window
    topk_ids: list[torch.Tensor]     # per window: positions x k
    topk_lp: list[torch.Tensor]
    target_lp: list[torch.Tensor]

    @property
    def kl_protocol(self) -> str:
        return kl_protocol(self.k)

    @classmethod
    def load(cls, path: Path | str) -> "SavedReference":
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such reference logits file")
        try:
            with safe_open(p, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{p}: not a reference logits file ({' '.join(str(e).split())[:120]})") from None
        if meta.get("schema") != SCHEMA:
            raise ConfigError(f"{p}: not a reference logits file of schema {SCHEMA} (schema: {meta.get('schema')!r})")
        try:
            lens = tensors["window_lens"].tolist()
            scored = tensors["scored_lens"].tolist()
            cut = lambda t, sizes: list(torch.split(t, sizes))       # noqa: E731
            out = cls(path=p, k=int(meta["k"]), vocab_size=int(meta["vocab_size"]),
                      protocol=json.loads(meta["protocol"]), reference=json.loads(meta["reference"]),
                      windows=len(lens), ids=cut(tensors["ids"], lens), topk_ids=cut(tensors["topk_ids"], scored),
                      topk_lp=cut(tensors["topk_logprobs"], scored), target_lp=cut(tensors["target_logprobs"], scored))
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ConfigError(f"{p}: reference logits file is damaged ({type(e).__name__}: {e})") from None
        return out

    def check_protocol(self, protocol: dict[str, Any], where) -> None:
        for key in MATCHED:
            if self.protocol.get(key) != protocol.get(key):
                what = "text" if key == "text_sha256" else key
                raise ConfigError(f"{where}: saved for another {what} ({self.protocol.get(key)!r}, this run: "
                                  f"{protocol.get(key)!r})")

    def score(self, window: int, ids: list[int], logprobs: torch.Tensor, targets: torch.Tensor,
              where) -> tuple[float, float, int]:
        """The reference's NLL, KL(reference || model) over top-k + tail, and argmax agreements of one
        window, from the model's log-probabilities of ids[1:]."""
        if window >= self.windows or self.ids[window].tolist() != ids:
            raise ConfigError(f"{where}: window {window + 1} holds other tokens than this text gives "
                              f"(another tokenizer?)")
        top_ids, top_lp = self.topk_ids[window].long(), self.topk_lp[window].double()
        q_top = logprobs.double().gather(-1, top_ids)
        p = top_lp.exp()
        kl = (p * (top_lp - q_top)).sum(-1)
        p_tail = (1 - p.sum(-1)).clamp(min=0)
        q_tail = (1 - q_top.exp().sum(-1)).clamp(min=TINY)
        kl += torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=TINY).log() - q_tail.log()), torch.zeros_like(p_tail))
        agree = int((logprobs.argmax(-1) == top_ids[:, 0]).sum())
        return -self.target_lp[window].double().sum().item(), kl.sum().item(), agree
