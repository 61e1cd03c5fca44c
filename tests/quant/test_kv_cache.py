"""KV-cache quantization: attention accuracy, kernel parity, and the end-to-end acceptance."""
from __future__ import annotations

import pytest
import torch

from llmc.kernels import context, kernel_for
from llmc.kernels.reference.kv_quant import KV_DTYPES
from llmc.runtime.kv_cache import KVCacheSpec, PagedKVCache
from tests.helpers import fast_kernel_sets
from tests.kernels.test_cpu_parity import mixed_batch
from tests.tolerances import sqnr_db

KV_INT8_MIN_SQNR_DB = 35.0        # attention output, int8 cache vs fp32 cache, calibrated absmax scales
KV_FP8_MIN_SQNR_DB = 25.0


def attend(impl, cache_dtype, scales, q, k, v, heads, kv_heads, d=8):
    batch = mixed_batch()
    kv = PagedKVCache(KVCacheSpec(1, kv_heads, d, cache_dtype), num_blocks=13, block_size=4)
    # fill the earlier context through the kernel itself, so it is stored the same way
    k_all = torch.randn(13 * 4, kv_heads * d, generator=torch.Generator().manual_seed(7))
    v_all = torch.randn(13 * 4, kv_heads * d, generator=torch.Generator().manual_seed(8))
    from llmc.runtime.batch import RaggedBatch
    warm = RaggedBatch(token_ids=[0] * 52, query_lens=[52], context_lens=[52], block_tables=[list(range(13))],
                       block_size=4)
    fn = kernel_for("attention", impl).fn
    attrs = dict(layer=0, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, scale=d ** -0.5, sliding_window=None)
    fn(context(impl, warm, kv), torch.zeros(52, heads * d), k_all, v_all, *scales, **attrs)
    return fn(context(impl, batch, kv), q, k, v, *scales, **attrs)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3"])
def test_quantized_cache_attention(heads, kv_heads, kv):
    g = torch.Generator().manual_seed(1)
    t = len(mixed_batch().token_ids)
    q, k, v = torch.randn(t, heads * 8, generator=g), torch.randn(t, kv_heads * 8, generator=g), \
        torch.randn(t, kv_heads * 8, generator=g)
    top = 127.0 if kv == "int8" else 448.0
    scales = (torch.full((kv_heads,), 4.5 / top), torch.full((kv_heads,), 4.5 / top))   # |randn| < 4.5 here
    exact = attend("reference", torch.float32, (), q, k, v, heads, kv_heads)
    for impl in ("reference", *fast_kernel_sets()):
        out = attend(impl, KV_DTYPES[kv], scales, q, k, v, heads, kv_heads)
        bound = KV_INT8_MIN_SQNR_DB if kv == "int8" else KV_FP8_MIN_SQNR_DB
        assert sqnr_db(exact, out) > bound, (impl, sqnr_db(exact, out))
    ref = attend("reference", KV_DTYPES[kv], scales, q, k, v, heads, kv_heads)
    for impl in fast_kernel_sets():
        torch.testing.assert_close(attend(impl, KV_DTYPES[kv], scales, q, k, v, heads, kv_heads), ref,
                                   rtol=1e-5, atol=1e-5)


def test_kv_int8_end_to_end(tmp_path, stories_w8a16, stories_w4a16):
    from llmc.bench.quality import quality
    from llmc.compiler import compile
    from llmc.generation import generate
    from llmc.inspection import inspect
    from llmc.quantizer import quantize_checkpoint
    from llmc.quantized.formats import TensorQuant
    from llmc.quantized.scheme import QuantRecipe, resolve_scheme
    from llmc.runtime.sampler import SamplingParams
    from tests.helpers import GOLDEN, STORIES
    text = GOLDEN / "tinystories_valid_head.txt"
    kv = QuantRecipe(scheme=resolve_scheme("w8a16"), kv_cache=TensorQuant(dtype="int8"), calib_samples=16,
                     calib_seqlen=256)
    quantize_checkpoint(STORIES, tmp_path / "kv", kv)
    report = inspect(tmp_path / "kv")
    assert report.kv_cache_dtype == "int8" and report.kv_cache_bytes_per_token == inspect(STORIES).kv_cache_bytes_per_token // 4
    q = {n: quality(p, STORIES, text, seqlen=256, max_tokens=4000)
         for n, p in (("kv", tmp_path / "kv"), ("w8", stories_w8a16), ("w4", stories_w4a16))}
    added_by_kv = q["kv"].kl_divergence - q["w8"].kl_divergence
    assert 0 < added_by_kv < q["w4"].kl_divergence                    # KV int8 adds less KLD than w4a16 RTN
    compile(tmp_path / "kv", tmp_path / "kv.engine")
    p = SamplingParams(max_tokens=20)
    assert generate(tmp_path / "kv", ["Once upon a time"], p).completions[0].token_ids == \
        generate(tmp_path / "kv.engine", ["Once upon a time"], p).completions[0].token_ids
