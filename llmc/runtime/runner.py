"""The engine loop: one Runner owns the model's backend (llmc.targets: the engine's target, with a
kernel set and a device), the paged KV cache in the backend's layout, the scheduler and the
sampler. Each `step()` schedules, builds one ragged batch, runs it, samples and retires requests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmc.errors import ConfigError, OptionError
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.kv_cache import BlockAllocator
from llmc.runtime.sampler import SamplingParams, sample_rows
from llmc.runtime.scheduler import Request, Scheduler, SchedulerConfig
from llmc.targets import open_backend

KV_CACHE_BUDGET = 2 << 30       # bytes, when the number of blocks is not given


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    kernels: str | None = None               # None: the target's default kernel set
    device: str = "cpu"                      # where the backend runs (a torch device string)
    block_size: int = 16
    num_blocks: int | None = None            # None: enough for max_num_seqs full-length sequences, within budget
    max_num_seqs: int = 16
    max_batched_tokens: int = 2048
    prefix_caching: bool = True              # share the KV blocks of common prefixes between requests

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise OptionError("num_blocks", f"must be at least 1, got {self.num_blocks}")


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    finish_reason: str | None
    logprob: float | None = None                       # with SamplingParams.logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()


class Runner:
    def __init__(self, model, cfg: RuntimeConfig = RuntimeConfig()) -> None:
        self.model, self.cfg = model, cfg
        self.backend = open_backend(model, cfg)
        self.max_model_len = model.arch.max_position_embeddings
        num_blocks = cfg.num_blocks
        if num_blocks is None:
            want = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
            fit = max(1, KV_CACHE_BUDGET // (cfg.block_size * self.backend.kv_spec.bytes_per_token))
            num_blocks = min(want, fit)
        self.kv = self.backend.allocate_kv(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=cfg.max_num_seqs,
                                                   max_batched_tokens=cfg.max_batched_tokens,
                                                   block_size=cfg.block_size,
                                                   cache_salt=str(self.backend.kv_spec.dtype)),
                                   BlockAllocator(num_blocks, caching=cfg.prefix_caching))
        self.in_step: list[str] = []         # the requests of the step running (or that raised)
        self.eos_ids = frozenset(model.tokenizer.info.eos_token_ids)

    @property
    def capacity_tokens(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ConfigError unless the request can run here. Reads only the configuration, so any
        thread may call it."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty after tokenization")
        if len(prompt_ids) >= self.max_model_len:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                              f"{self.max_model_len}, which leaves no room to generate")
        vocab = self.model.arch.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ConfigError(f"prompt token ids must lie in [0, {vocab})")
        longest = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if longest > self.capacity_tokens:
            raise ConfigError(f"a request of up to {longest} tokens does not fit the KV cache "
                              f"({self.capacity_tokens} tokens)", hint="give the cache more blocks")

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        self.check(prompt_ids, params)
        return self.scheduler.add(prompt_ids, params, request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One iteration: returns the token sampled for every request that produced one."""
        sched = self.scheduler
        plan = sched.step()
        if not plan.num_tokens:
            return []
        reqs = [sched.requests[rid] for rid in plan.num_tokens]
        self.in_step = list(plan.num_tokens)
        tokens: list[int] = []
        for req in reqs:
            tokens += req.token_slice(req.num_computed, req.num_computed + plan.num_tokens[req.id])
        batch = RaggedBatch(
            token_ids=tokens,
            query_lens=[plan.num_tokens[r.id] for r in reqs],
            context_lens=[r.num_computed + plan.num_tokens[r.id] for r in reqs],
            block_tables=[r.block_table for r in reqs],
            block_size=self.kv.block_size,
            device=self.backend.device,
        )
        logits = self.backend.forward(batch, self.kv).cpu()
        for req in reqs:
            req.num_computed += plan.num_tokens[req.id]
            sched.commit(req)
        sampling = [(row, req) for row, req in enumerate(reqs) if not req.pending]   # pending: a prefill chunk
        events = []
        for (_, req), s in zip(sampling, sample_rows(logits, sampling)):
            req.output_ids.append(s.token_id)
            reason = self._finish_reason(req, s.token_id)
            if reason is not None:
                sched.finish(req, reason)
            events.append(TokenEvent(req.id, s.token_id, reason, s.logprob, s.top_logprobs))
        self.in_step = []
        return events

    def finish(self, request_id: str, reason: str) -> bool:
        """End a request now (a stop string, a client gone): "stop", "abort", ... Its blocks are
        released at once. False when it had already finished."""
        return self.scheduler.abort(request_id, reason) is not None

    def _finish_reason(self, req: Request, token: int) -> str | None:
        if (token in self.eos_ids and not req.params.ignore_eos) or token in req.params.stop_token_ids:
            return "stop"
        if len(req.output_ids) >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None
