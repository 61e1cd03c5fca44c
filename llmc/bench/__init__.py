"""Benchmarks behind `llmc bench`: quality (perplexity, KL divergence, top-1 agreement)."""
