"""The runtime: ragged batches, the paged KV cache, the executor, the sampler and the scheduler."""
