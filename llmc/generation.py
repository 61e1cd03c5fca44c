"""`generate`: prompts in, completions out, all prompts run together as one in-flight batch through
the engine loop (the same path the server takes), text streamed as it is produced."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmc.errors import ConfigError
from llmc.runtime.runner import RuntimeConfig
from llmc.runtime.sampler import SamplingParams


@dataclass(frozen=True)
class Completion:
    prompt: str | list[int]
    text: str
    token_ids: list[int]              # generated ids only
    finish_reason: str                # "stop" (EOS, a stop token or a stop string) | "length"
    prompt_tokens: int
    stop_reason: str | None = None    # the stop string that ended it
    logprobs: list[dict] | None = None   # with params.logprobs: per token, its logprob and the top N


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
             model=None, on_text: Callable[[int, str], None] | None = None) -> GenerateResult:
    """Run every prompt (text, or a list of token ids; one prompt or a list of them) to completion,
    all as one in-flight batch. `model` (already loaded) skips loading `path`; `on_text(i, text)`
    receives prompt i's text as it is produced."""
    from llmc.loader import load_model
    from llmc.runtime.engine_loop import EngineLoop

    prompts = check_prompts(prompts)
    model = model or load_model(path)
    encoded = [list(p) if isinstance(p, (list, tuple)) else model.tokenizer.encode(p) for p in prompts]
    loop = EngineLoop(model, runtime)
    for ids in encoded:
        loop.runner.check(ids, params)            # every prompt is checked before any runs
    loop.start()
    t0 = time.perf_counter()
    try:
        streams = [loop.submit(ids, params) for ids in encoded]
        completions = [_collect(i, p, ids, s, params, on_text) for i, (p, ids, s) in enumerate(zip(prompts, encoded, streams))]
    finally:
        loop.shutdown()
    seconds = time.perf_counter() - t0
    if loop.crashed is not None:
        raise loop.crashed
    stats = GenerateStats(seconds=seconds, prompt_tokens=sum(map(len, encoded)),
                          generated_tokens=sum(len(c.token_ids) for c in completions), steps=loop.stats().steps)
    return GenerateResult(completions, stats, loop.runner.backend.report())


def _collect(i: int, prompt, ids: list[int], stream, params: SamplingParams, on_text) -> Completion:
    tokens, text, logprobs, last = [], [], [], None
    for out in stream:
        tokens += out.token_ids
        text.append(out.text)
        logprobs += [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                     for lp in out.logprobs]
        if on_text is not None and out.text:
            on_text(i, out.text)
        last = out
    if last.finish_reason == "error":
        raise RuntimeError(f"prompt {i} failed: {last.error}")
    return Completion(prompt=prompt, text="".join(text), token_ids=tokens, finish_reason=last.finish_reason,
                      prompt_tokens=len(ids), stop_reason=last.stop_reason,
                      logprobs=logprobs if params.logprobs is not None else None)
