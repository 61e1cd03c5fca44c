"""Iteration-level (in-flight) scheduling over the paged KV cache.

No prefill and decode modes: each request owes `pending` tokens (an uncomputed prompt, or its last
sampled token) and every step pays off as much as the token budget allows, so prefills, prefill
chunks and decodes share a step, and requests join and leave the batch at any step.

Prefix caching: a request admitted (or readmitted after a preemption) first takes the cached blocks
that hold the longest prefix of its tokens (BlockAllocator.lookup) and computes only the rest; the
last token is always computed, so its logits exist. After each step, `commit` registers the blocks
the step filled, keyed by the chain of block hashes, so later requests find them.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from llmc.runtime.kv_cache import BlockAllocator, block_hash
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
    finish_reason: str | None = None         # "stop" (an end-of-sequence token or stop string), "length", "abort"
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0               # prompt tokens found in the prefix cache at (first) admission
    block_keys: list[bytes] = field(default_factory=list)   # prefix keys of its first full blocks
    num_registered: int = 0                  # blocks of its table registered in the prefix cache

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
    cache_salt: str = ""                     # part of every prefix key: the KV format


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
        self.num_preemptions = 0                 # counters since start
        self.num_prefix_hit_tokens = 0

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
        """Free its blocks and put it first in line; it recomputes its tokens when readmitted (less
        the prefix it finds cached then)."""
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req.id)

    def _release(self, req: Request) -> None:
        self.allocator.free(req.block_table[::-1])
        req.block_table, req.num_computed, req.num_registered = [], 0, 0

    def _key(self, req: Request, i: int) -> bytes:
        """The prefix key of the request's block i (its tokens are all known), computed once."""
        bs = self.cfg.block_size
        while len(req.block_keys) <= i:
            j = len(req.block_keys)
            parent = req.block_keys[j - 1] if j else None
            req.block_keys.append(block_hash(parent, req.token_slice(j * bs, (j + 1) * bs), self.cfg.cache_salt))
        return req.block_keys[i]

    def _take_cached_prefix(self, req: Request) -> None:
        """Start a request with no blocks from the cached blocks of its longest cached prefix."""
        if not self.allocator.caching:
            return
        full = (req.num_tokens - 1) // self.cfg.block_size      # the last token is always computed
        blocks = self.allocator.lookup([self._key(req, i) for i in range(full)])
        req.block_table, req.num_computed = blocks, len(blocks) * self.cfg.block_size
        req.num_registered = len(blocks)

    def _admit(self, req: Request, budget: int) -> int:
        """Blocks for the head of the queue: its cached prefix, then the blocks for the tokens it can
        compute within `budget`. Returns those tokens, or 0 (holding nothing) when blocks run out."""
        self._take_cached_prefix(req)
        n = min(req.pending, budget)
        if not self._allocate(req, n):
            self._release(req)
            return 0
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed
        self.num_prefix_hit_tokens += req.num_computed
        return n

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
            n = self._admit(req, budget)
            if not n:
                break                                            # the head of the queue waits; nobody skips it
            self.running.append(self.waiting.popleft())
            req.status = Status.RUNNING
            plan.num_tokens[req.id] = n
            budget -= n
        return plan

    def commit(self, req: Request) -> None:
        """After a step computed its tokens: register the blocks it filled in the prefix cache."""
        if self.allocator.caching:
            full = req.num_computed // self.cfg.block_size
            for i in range(req.num_registered, full):
                self.allocator.register(req.block_table[i], self._key(req, i))
            req.num_registered = max(req.num_registered, full)

    def finish(self, req: Request, reason: str) -> None:
        """Retire a running request: its blocks are released (its full ones stay cached)."""
        req.status, req.finish_reason = Status.FINISHED, reason
        self.running.remove(req)
        self._release(req)
        del self.requests[req.id]

    def abort(self, request_id: str, reason: str = "abort") -> Request | None:
        """End a request now, waiting or running, with this finish reason: its blocks are released at
        once. None when it is not here (already finished)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is Status.WAITING:
            self.waiting.remove(req)
            req.status, req.finish_reason = Status.FINISHED, reason
            del self.requests[req.id]
        else:
            self.finish(req, reason)
        return req
