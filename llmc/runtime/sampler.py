"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded per request."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.errors import OptionError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None          # None: no top-k cut
    seed: int | None = None           # per request: the same seed gives the same tokens, batched or not
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise OptionError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise OptionError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise OptionError("top_k", f"must be at least 1, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise OptionError("seed", f"must be in [0, 2**63), got {self.seed}")

    def make_generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def filter_logits(logits: Tensor, top_k: int | None, top_p: float) -> Tensor:
    """logits [V] (already divided by temperature) with everything outside top-k / top-p set to -inf."""
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p     # keep the smallest prefix reaching top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V]."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: Tensor, rows: list[tuple[int, SamplingParams, torch.Generator | None]]) -> list[int]:
    """One token id for each (row of logits [R, V] on the CPU, its params, its generator): the greedy
    rows by one argmax over all of them, the others by `sample`. NumPy's argmax (the first maximum, or
    the first NaN, as torch's) takes a tenth of torch's time: 0.16 against 1.9 ms for 32 rows of a
    49k vocabulary, whose per-row calls had been a fifth of a batch-32 step's time outside the model."""
    greedy = [row for row, params, _ in rows if params.temperature == 0]
    best: dict[int, int] = {}
    if greedy:
        values = logits.float().numpy()
        values = values if len(greedy) == len(values) else values[greedy]
        best = dict(zip(greedy, values.argmax(axis=1).tolist()))
    return [best[row] if params.temperature == 0 else sample(logits[row], params, generator)
            for row, params, generator in rows]
