"""Benchmarks behind `llmc bench`: quality (perplexity, KL divergence, top-1 agreement against a
reference) and throughput (prefill and decode speed over a sweep of batch sizes)."""
