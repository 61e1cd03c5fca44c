"""`bench quality`: perplexity, KL divergence and top-1 agreement of a model against a reference.

The text (CRLF normalised to LF) is tokenized once without special tokens, then cut into windows by
a protocol (`PROTOCOLS`):
- `windows` (the default): consecutive windows of `seqlen - 1` tokens, each scored with BOS
  prepended (when the tokenizer has one), so every text token is predicted exactly once;
- `llama-perplexity`: llama.cpp's `llama-perplexity` protocol, so the numbers compare with its
  `--kl-divergence` runs: BOS, then the text, cut into `len // seqlen` chunks of `seqlen` tokens
  (the rest dropped); each chunk's first token is replaced by BOS, and only its second half is
  scored (the predictions at positions seqlen/2 .. seqlen-2).
Per scored token: NLL under the model and the reference, KL(reference || model) over the
vocabulary, and whether the two argmaxes agree.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from llmc.bench.reference_logits import ReferenceLogits, SavedReference
from llmc.bench.result import BenchResult, exact, model_identity, sampled
from llmc.errors import ConfigError, OptionError
from llmc.io import sha256_file
from llmc.paths import bytes_on_disk
from llmc.runtime.batch import RaggedBatch
from llmc.targets import open_backend


@dataclass(frozen=True)
class QualityResult:
    model: str
    reference: str                   # the reference model's path, or the saved reference logits' file
    text: str
    seqlen: int
    windows: int
    tokens: int                      # scored tokens
    perplexity: float
    reference_perplexity: float
    kl_divergence: float             # mean per scored token, nats (over the reference's top-k + tail when saved)
    top1_agreement: float            # 0-1
    seconds: float
    backend: dict                    # what ran the model: target, device, kernel set, kernels by op (native or not)
    reference_backend: dict | None   # ... and the reference (None: its saved logits)
    records: list[dict] = field(default_factory=list, repr=False)   # per window: id, tokens, nll, ref_nll, kl, agree
    model_info: dict = field(default_factory=dict, repr=False)      # llmc.bench.result.model_identity + size
    config: dict = field(default_factory=dict, repr=False)          # the protocol (text and reference checksums)

    def to_result(self, env: dict) -> BenchResult:
        """The result in the bench schema (llmc.bench.result): the metrics recomputable from the windows."""
        s = {"windows": self.records}
        metrics = {
            "perplexity": sampled("exp_ratio", "windows", ("nll", "tokens"), s, "ppl", "lower"),
            "kl_divergence": sampled("ratio", "windows", ("kl", "tokens"), s, "nats/token", "lower"),
            "top1_agreement": sampled("ratio", "windows", ("agree", "tokens"), s, "fraction", "higher"),
            "reference_perplexity": sampled("exp_ratio", "windows", ("ref_nll", "tokens"), s, "ppl", None),
            "tokens": exact(self.tokens, "tokens"),
            "bytes_on_disk": exact(self.model_info.get("bytes_on_disk"), "bytes", "lower"),
        }
        return BenchResult(kind="quality", model=self.model_info, env=env, config=self.config, metrics=metrics,
                           samples=s, details={"seconds": self.seconds, "backend": self.backend,
                                               "reference_backend": self.reference_backend})


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


def consecutive_windows(stream: list[int], seqlen: int, bos: int | None) -> Iterator[tuple[list[int], int]]:
    """(ids, first scored position): BOS + seqlen - 1 text tokens, every prediction scored."""
    width = seqlen - 1 if bos is not None else seqlen
    for start in range(0, len(stream), width):
        ids = ([bos] if bos is not None else []) + stream[start:start + width]
        if len(ids) >= 2:
            yield ids, 0


def llama_perplexity_chunks(stream: list[int], seqlen: int, bos: int | None) -> Iterator[tuple[list[int], int]]:
    """(ids, first scored position) as llama.cpp's llama-perplexity cuts and scores the text."""
    tokens = ([bos] if bos is not None else []) + stream
    for start in range(0, len(tokens) - seqlen + 1, seqlen):
        ids = tokens[start:start + seqlen]
        if bos is not None:
            ids = [bos] + ids[1:]
        yield ids, seqlen // 2


PROTOCOLS = {"windows": consecutive_windows, "llama-perplexity": llama_perplexity_chunks}


def window_id(ids: list[int]) -> str:
    """A window's identity: the same tokens are the same window in every run (paired comparisons)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def quality(path: Path | str, reference: Path | str | None, text_file: Path | str, seqlen: int = 512,
            max_tokens: int | None = None, kernels: str | None = None, device: str = "cpu",
            on_window=None, save_reference: Path | str | None = None,
            reference_logits: Path | str | None = None, top_k: int = 32,
            protocol_name: str = "windows") -> QualityResult:
    """Score `path` against `reference` on a text file (the protocol above); both run on their own
    target with the kernel set `kernels` (None: each target's default) on `device`.

    `reference_logits` (instead of `reference`): the reference's top-k log-probabilities saved by an
    earlier run with `save_reference` (llmc.bench.reference_logits), so the reference need not run;
    KL divergence is then over the top-k and the rest of the mass as one outcome (a lower bound of the
    full KL, recorded as the result's `kl` protocol). `save_reference` writes them for later runs."""
    from llmc.loader import load_model
    from llmc.runtime.runner import RuntimeConfig

    if (reference is None) == (reference_logits is None):
        raise OptionError("reference", "give the reference model (--reference) or its saved logits "
                          "(--reference-logits), one of the two")
    if save_reference is not None and reference is None:
        raise OptionError("save_reference", "saving the reference's logits needs the reference model (--reference)")
    if not 1 <= top_k <= 1024:
        raise OptionError("top_k", f"must be in [1, 1024], got {top_k}")
    if protocol_name not in PROTOCOLS:
        raise OptionError("protocol", f"unknown protocol {protocol_name!r}; known: {', '.join(PROTOCOLS)}")
    if save_reference is not None:                 # refused before the work, not after it
        from llmc.io import check_output
        check_output(save_reference, [path, reference, text_file], force=True, directory=False,
                     what="reference logits")
    t0 = time.perf_counter()
    text_sha = sha256_file(Path(text_file)) if Path(text_file).is_file() else None
    saved = SavedReference.load(reference_logits) if reference_logits is not None else None
    model = load_model(path)
    ref = load_model(reference) if reference is not None else None
    ref_vocab = ref.arch.vocab_size if ref is not None else saved.vocab_size
    if model.arch.vocab_size != ref_vocab:
        raise ConfigError(f"the model's vocabulary ({model.arch.vocab_size}) differs from the reference's "
                          f"({ref_vocab})")
    limit = min(model.arch.max_position_embeddings, ref.arch.max_position_embeddings if ref is not None else 1 << 30)
    if not 2 <= seqlen <= limit:
        raise ConfigError(f"--seqlen must be in [2, {limit}] for these models, got {seqlen}")
    text = read_text(Path(text_file))
    tok = model.tokenizer
    stream = tok._need().encode(text, add_special_tokens=False).ids
    if ref is not None and ref.tokenizer.available and \
            ref.tokenizer._need().encode(text[:2000], add_special_tokens=False).ids != \
            tok._need().encode(text[:2000], add_special_tokens=False).ids:
        raise ConfigError("the model and the reference tokenize the text differently")
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if stream and max(stream) >= min(model.arch.vocab_size, ref_vocab):
        raise ConfigError("the tokenizer produces ids beyond the model's vocabulary")
    bos = tok.info.bos_token_id
    ref_identity = saved.reference if saved is not None else model_identity(reference)
    protocol = {"protocol": protocol_name, "text_sha256": text_sha, "seqlen": seqlen, "max_tokens": max_tokens,
                "reference_sha256": ref_identity["sha256"],
                "kl": saved.kl_protocol if saved is not None else "exact"}
    if saved is not None:
        saved.check_protocol(protocol, reference_logits)
    runtime = RuntimeConfig(kernels=kernels, device=device)
    a = _Scorer(model, runtime, seqlen)
    b = _Scorer(ref, runtime, seqlen) if ref is not None else None
    keep = ReferenceLogits(top_k) if save_reference is not None else None
    records = []
    for ids, first in PROTOCOLS[protocol_name](stream, seqlen, bos):
        targets = torch.tensor(ids[first + 1:])
        rows = torch.arange(len(targets))
        lp = a.logprobs(ids)[first:-1]                                  # predictions of ids[first + 1:]
        if b is not None:
            lq = b.logprobs(ids)[first:-1]
            ref_nll = -lq[rows, targets].double().sum().item()
            kl = (lq.exp() * (lq - lp)).sum(dim=-1).double().sum().item()
            agree = int((lp.argmax(-1) == lq.argmax(-1)).sum())
            if keep is not None:
                keep.add(ids, lq, targets)
        else:
            ref_nll, kl, agree = saved.score(len(records), ids, lp, targets, reference_logits)
        records.append({"id": window_id(ids), "tokens": len(targets), "nll": -lp[rows, targets].double().sum().item(),
                        "ref_nll": ref_nll, "kl": kl, "agree": agree})
        if on_window is not None:
            on_window(len(records), sum(r["tokens"] for r in records))
    if not records:
        raise ConfigError(f"{text_file}: too short to score a single token")
    if saved is not None and len(records) != saved.windows:
        raise ConfigError(f"{reference_logits}: holds {saved.windows} windows, this text makes {len(records)}")
    if keep is not None:
        keep.save(save_reference, {**protocol, "kl": keep.kl_protocol}, ref_identity,
                  ref.arch.vocab_size, text_file=str(text_file))
    scored = sum(r["tokens"] for r in records)
    nll, ref_nll = sum(r["nll"] for r in records), sum(r["ref_nll"] for r in records)
    info = {**model_identity(path), "bytes_on_disk": bytes_on_disk(path)}
    config = {**protocol, "text": str(text_file), "reference": str(reference if reference is not None
                                                                   else reference_logits),
              "kernels": kernels, "device": device}
    return QualityResult(model=str(path), reference=config["reference"], text=str(text_file), seqlen=seqlen,
                         windows=len(records), tokens=scored, perplexity=math.exp(nll / scored),
                         reference_perplexity=math.exp(ref_nll / scored),
                         kl_divergence=sum(r["kl"] for r in records) / scored,
                         top1_agreement=sum(r["agree"] for r in records) / scored, seconds=time.perf_counter() - t0,
                         backend=a.backend.report(), reference_backend=b.backend.report() if b is not None else None,
                         records=records, model_info=info, config=config)

