"""`generate`: prompts in, completions out, all prompts run together as one in-flight batch."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llmc.errors import ConfigError
from llmc.runtime.runner import Runner, RuntimeConfig
from llmc.runtime.sampler import SamplingParams


@dataclass(frozen=True)
class Completion:
    prompt: str | list[int]
    text: str
    token_ids: list[int]              # generated ids only
    finish_reason: str                # "stop" | "length"
    prompt_tokens: int


@dataclass(frozen=True)
class GenerateStats:
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    steps: int

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class GenerateResult:
    completions: list[Completion]
    stats: GenerateStats
    backend: dict                     # what ran: target, device, kernel set, kernels by op (native or not)


def check_prompts(prompts) -> list:
    """One prompt (a str, or a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError("give at least one prompt: a string, a list of token ids, or a list of those")
    for i, p in enumerate(prompts):
        ok = isinstance(p, str) or (isinstance(p, (list, tuple)) and
                                    all(isinstance(t, int) and not isinstance(t, bool) for t in p))
        if not ok:
            raise ConfigError(f"prompt {i} is a {type(p).__name__}; a prompt is a string or a list of token ids")
    return list(prompts)


def generate(path: Path | str, prompts: str | list[str] | list[int] | list[list[int]],
             params: SamplingParams = SamplingParams(), runtime: RuntimeConfig = RuntimeConfig(),
             model=None) -> GenerateResult:
    """Run every prompt (text, or a list of token ids; one prompt or a list of them) to completion,
    all as one in-flight batch. `model` (already loaded) skips loading `path`."""
    from llmc.loader import load_model

    prompts = check_prompts(prompts)
    model = model or load_model(path)
    runner = Runner(model, runtime)
    encoded = [list(p) if isinstance(p, (list, tuple)) else model.tokenizer.encode(p) for p in prompts]
    reqs = [runner.add(ids, params) for ids in encoded]
    t0, steps = time.perf_counter(), 0
    while runner.has_work:
        runner.step()
        steps += 1
    seconds = time.perf_counter() - t0
    tok = model.tokenizer
    completions = [Completion(prompt=p, text=tok.decode_continuation(ids, r.output_ids) if tok.available else "",
                              token_ids=list(r.output_ids),
                              finish_reason=r.finish_reason or "length", prompt_tokens=len(ids))
                   for p, r, ids in zip(prompts, reqs, encoded)]
    stats = GenerateStats(seconds=seconds, prompt_tokens=sum(map(len, encoded)),
                          generated_tokens=sum(len(c.token_ids) for c in completions), steps=steps)
    return GenerateResult(completions, stats, runner.backend.report())
