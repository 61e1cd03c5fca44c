"""Benchmarks behind `llmc bench`: quality (perplexity, KL divergence, top-1 agreement against a
reference), throughput (offline prefill and decode speed over a sweep of batch sizes) and serve
(online load against an OpenAI-compatible server: TTFT, TPOT, ITL, throughput, goodput)."""
