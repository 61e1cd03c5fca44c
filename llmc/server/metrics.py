"""The server's Prometheus metrics. Their names are a contract (dashboards and autoscalers read them):

gauges      llmc_requests_waiting, llmc_requests_running, llmc_kv_blocks_total, llmc_kv_blocks_used
            (held by live requests), llmc_kv_blocks_cached (evictable prefix-cache blocks)
counters    llmc_prompt_tokens_total, llmc_generation_tokens_total, llmc_prefix_cache_hit_tokens_total,
            llmc_preemptions_total, llmc_requests_finished_total{finish_reason},
            llmc_requests_rejected_total{reason}
histograms  llmc_time_to_first_token_seconds, llmc_inter_token_latency_seconds,
            llmc_e2e_request_latency_seconds

Gauges and the engine's counters are read from the engine loop when scraped (one consistent
snapshot, nothing to keep in step); histograms are observed by the loop as tokens are produced.
Each server has a registry of its own, so several can live in one process (tests).
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmc.runtime.engine_loop import LoopStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("invalid_api_key", "queue_full", "draining")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)


class _LoopCollector:
    """Gauges and counters from one LoopStats snapshot per scrape."""

    def __init__(self, stats: Callable[[], LoopStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats()
        for name, text, value in (
                ("llmc_requests_waiting", "Requests submitted and not yet running.", s.waiting),
                ("llmc_requests_running", "Requests in the running batch.", s.running),
                ("llmc_kv_blocks_total", "Blocks of the paged KV cache.", s.kv_blocks_total),
                ("llmc_kv_blocks_used", "KV blocks held by live requests.", s.kv_blocks_used),
                ("llmc_kv_blocks_cached", "KV blocks held by no request that keep a cached prefix (evictable).",
                 s.kv_blocks_cached)):
            yield GaugeMetricFamily(name, text, value=value)
        for name, text, value in (
                ("llmc_prompt_tokens", "Prompt tokens of the requests admitted.", s.prompt_tokens),
                ("llmc_generation_tokens", "Tokens generated.", s.generation_tokens),
                ("llmc_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache, not computed.",
                 s.prefix_cache_hit_tokens),
                ("llmc_preemptions", "Requests preempted (their KV blocks freed, recomputed later).",
                 s.preemptions)):
            yield CounterMetricFamily(name, text, value=value)
        finished = CounterMetricFamily("llmc_requests_finished", "Requests ended, by finish reason.",
                                       labels=["finish_reason"])
        for reason in sorted(set(FINISH_REASONS) | set(s.finished)):
            finished.add_metric([reason], s.finished.get(reason, 0))
        yield finished


class ServerMetrics:
    """The registry of one server: the loop's observer (histograms) and the rejection counter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "Submission to first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("llmc_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("llmc_e2e_request_latency_seconds", "Submission to the request's end.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rejected = Counter("llmc_requests_rejected", "Requests refused before running, by reason.",
                                labelnames=["reason"], registry=self.registry)
        for reason in REJECT_REASONS:                 # every reason's series exists from the start, at 0
            self.rejected.labels(reason=reason)

    def watch(self, stats: Callable[[], LoopStats]) -> None:
        self.registry.register(_LoopCollector(stats))

    # LoopObserver
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, reason: str, seconds: float) -> None:
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
