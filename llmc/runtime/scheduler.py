"""Iteration-level (in-flight) scheduling over the paged KV cache.

No prefill and decode modes: each request owes `pending` tokens (an uncomputed prompt, or its last
sampled token) and every step pays off as much as the token budget allows, so prefills, prefill
chunks and decodes share a step, and requests join and leave the batch at any step.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from llmc.runtime.kv_cache import BlockAllocator
from llmc.runtime.sampler import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0                    # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None         # "stop" (an end-of-sequence token) or "length"
    generator: torch.Generator | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt_ids)
        return (self.prompt_ids[start:stop] if stop <= p else
                self.prompt_ids[start:] + self.output_ids[max(0, start - p):stop - p])


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 16                   # sequences in one step
    max_batched_tokens: int = 2048           # tokens in one step (longer prompts are chunked)
    block_size: int = 16


@dataclass
class StepPlan:                       # plain data: the runner executes it, tests assert on it
    num_tokens: dict[str, int] = field(default_factory=dict)        # request id -> tokens this step
    preempted: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.cfg, self.allocator = cfg, allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        req = Request(id=request_id or f"req-{next(self._ids)}", prompt_ids=list(prompt_ids), params=params,
                      generator=params.make_generator())
        if req.id in self.requests:
            raise ValueError(f"request id {req.id!r} is in use")
        self.requests[req.id] = req
        self.waiting.append(req)
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, req: Request, n: int) -> int:
        total = -(-(req.num_computed + n) // self.cfg.block_size)
        return max(0, total - len(req.block_table))

    def _allocate(self, req: Request, n: int) -> bool:
        blocks = self.allocator.allocate(self._blocks_needed(req, n))
        if blocks is None:
            return False
        req.block_table.extend(blocks)
        return True

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        """Free its blocks and put it first in line; it recomputes its tokens when readmitted."""
        self.running.remove(req)
        self.allocator.free(req.block_table)
        req.block_table, req.num_computed, req.status = [], 0, Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req.id)

    def step(self) -> StepPlan:
        plan, budget = StepPlan(), self.cfg.max_batched_tokens
        for req in list(self.running):                           # 1) running requests, oldest first
            if req.status is not Status.RUNNING or budget == 0:  # (preempted earlier in this step)
                continue
            n = min(req.pending, budget)
            while not self._allocate(req, n):
                victim = self.running[-1]                        # evict the newest first
                self._preempt(victim, plan)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                plan.num_tokens[req.id] = n
                budget -= n
        while (self.waiting and budget and not plan.preempted    # 2) admit waiting requests, FCFS
               and len(self.running) < self.cfg.max_num_seqs):
            req = self.waiting[0]
            n = min(req.pending, budget)
            if not self._allocate(req, n):
                break                                            # the head of the queue waits; nobody skips it
            self.running.append(self.waiting.popleft())
            req.status = Status.RUNNING
            plan.num_tokens[req.id] = n
            budget -= n
        return plan

    def finish(self, req: Request, reason: str) -> None:
        req.status, req.finish_reason = Status.FINISHED, reason
        self.running.remove(req)
        self.allocator.free(req.block_table)
        req.block_table = []
        del self.requests[req.id]
