"""`bench quality`: perplexity, KL divergence and top-1 agreement of a model against a reference.

Protocol: the text (CRLF normalised to LF) is tokenized once without special tokens and cut into
consecutive windows of `seqlen - 1` tokens; each window is scored with BOS prepended (when the
tokenizer has one), so every text token is predicted exactly once. Per scored token: NLL under
the model and the reference, KL(reference || model) over the vocabulary, and whether the two
argmaxes agree.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc.errors import ConfigError
from llmc.runtime.batch import RaggedBatch
from llmc.targets import open_backend


@dataclass(frozen=True)
class QualityResult:
    model: str
    reference: str
    text: str
    seqlen: int
    windows: int
    tokens: int                      # scored tokens
    perplexity: float
    reference_perplexity: float
    kl_divergence: float             # mean per scored token, nats
    top1_agreement: float            # 0-1
    seconds: float
    backend: dict                    # what ran the model: target, device, kernel set, kernels by op (native or not)
    reference_backend: dict          # ... and the reference


def read_text(path: Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such text file")
    try:
        text = p.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ConfigError(f"{p}: is empty")
    return text


class _Scorer:
    """All-token logits of one sequence at a time through a model's backend."""

    def __init__(self, model, runtime, seqlen: int) -> None:
        self.backend = open_backend(model, runtime)
        self.block = 16
        self.kv = self.backend.allocate_kv(num_blocks=-(-seqlen // self.block), block_size=self.block)

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        batch = RaggedBatch(token_ids=ids, query_lens=[len(ids)], context_lens=[len(ids)],
                            block_tables=[list(range(-(-len(ids) // self.block)))], block_size=self.block,
                            all_logits=True, device=self.backend.device)
        return torch.log_softmax(self.backend.forward(batch, self.kv).float().cpu(), dim=-1)


def quality(path: Path | str, reference: Path | str, text_file: Path | str, seqlen: int = 512,
            max_tokens: int | None = None, kernels: str | None = None, device: str = "cpu",
            on_window=None) -> QualityResult:
    """Score `path` against `reference` on a text file (the protocol above); both run on their own
    target with the kernel set `kernels` (None: each target's default) on `device`."""
    from llmc.loader import load_model
    from llmc.runtime.runner import RuntimeConfig

    t0 = time.perf_counter()
    model, ref = load_model(path), load_model(reference)
    if model.arch.vocab_size != ref.arch.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model.arch.vocab_size}) differs from the reference's "
                          f"({ref.arch.vocab_size})")
    limit = min(model.arch.max_position_embeddings, ref.arch.max_position_embeddings)
    if not 2 <= seqlen <= limit:
        raise ConfigError(f"--seqlen must be in [2, {limit}] for these models, got {seqlen}")
    text = read_text(Path(text_file))
    tok = model.tokenizer
    stream = tok._need().encode(text, add_special_tokens=False).ids
    if ref.tokenizer.available and ref.tokenizer._need().encode(text[:2000], add_special_tokens=False).ids != \
            tok._need().encode(text[:2000], add_special_tokens=False).ids:
        raise ConfigError("the model and the reference tokenize the text differently")
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if stream and max(stream) >= min(model.arch.vocab_size, ref.arch.vocab_size):
        raise ConfigError("the tokenizer produces ids beyond the model's vocabulary")
    bos = tok.info.bos_token_id
    width = seqlen - 1 if bos is not None else seqlen
    runtime = RuntimeConfig(kernels=kernels, device=device)
    a, b = _Scorer(model, runtime, seqlen), _Scorer(ref, runtime, seqlen)
    nll = ref_nll = kl = 0.0
    agree = scored = windows = 0
    for start in range(0, len(stream), width):
        chunk = stream[start:start + width]
        ids = ([bos] if bos is not None else []) + chunk
        if len(ids) < 2:
            break
        targets = torch.tensor(ids[1:])
        lp, lq = a.logprobs(ids)[:-1], b.logprobs(ids)[:-1]           # predictions of ids[1:]
        rows = torch.arange(len(targets))
        nll -= lp[rows, targets].double().sum().item()
        ref_nll -= lq[rows, targets].double().sum().item()
        kl += (lq.exp() * (lq - lp)).sum(dim=-1).double().sum().item()
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        scored += len(targets)
        windows += 1
        if on_window is not None:
            on_window(windows, scored)
    if scored == 0:
        raise ConfigError(f"{text_file}: too short to score a single token")
    return QualityResult(model=str(path), reference=str(reference), text=str(text_file), seqlen=seqlen,
                         windows=windows, tokens=scored, perplexity=math.exp(nll / scored),
                         reference_perplexity=math.exp(ref_nll / scored), kl_divergence=kl / scored,
                         top1_agreement=agree / scored, seconds=time.perf_counter() - t0,
                         backend=a.backend.report(), reference_backend=b.backend.report())
