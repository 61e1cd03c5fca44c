"""The second golden model (stdlib-llama, 5M parameters, trained by golden/make_stdlib_llama.py)."""
from __future__ import annotations

import pytest

from llmc.bench.quality import quality
from llmc.loader import load_model
from llmc.quantized.formats import QuantizedWeight
from llmc.quantizer import quantize_checkpoint
from llmc.quantized.scheme import QuantRecipe, resolve_scheme
from tests.helpers import GOLDEN

MODEL = GOLDEN / "stdlib-llama"
TEXT = MODEL / "validation.txt"


def test_documented_validation_perplexity():
    """TRAINING.json records 51.7111 over the first 16,384 tokens of validation.txt (256-token windows)."""
    r = quality(MODEL, MODEL, TEXT, seqlen=257, max_tokens=16384)
    assert r.tokens == 16384 and r.perplexity == pytest.approx(51.7111, abs=5e-4)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    for algo in ("rtn", "gptq", "awq"):
        # rtn as plain round-to-nearest (minmax, symmetric): the baseline gptq and awq exist to beat
        recipe = QuantRecipe(scheme=resolve_scheme("w4a16", group_size=128, symmetric=True), algorithm=algo,
                             calib_samples=16,
                             calib_seqlen=256, weight_observer="minmax" if algo == "rtn" else None)
        quantize_checkpoint(MODEL, root / algo, recipe, calib=MODEL / "calibration.txt")
    return root


def test_group_128_with_a_partial_last_group(quantized):
    down = load_model(quantized / "rtn").weights.get("model.layers.0.mlp.down_proj.weight")
    assert isinstance(down, QuantizedWeight) and down.shape == (256, 688) and down.scale.shape == (256, 6)


def test_gptq_and_awq_beat_rtn_at_group_128(quantized):
    q = {a: quality(quantized / a, MODEL, TEXT, seqlen=256, max_tokens=4096) for a in ("rtn", "gptq", "awq")}
    assert q["gptq"].perplexity < q["rtn"].perplexity and q["awq"].perplexity < q["rtn"].perplexity
    assert q["gptq"].kl_divergence < q["rtn"].kl_divergence and q["awq"].kl_divergence < q["rtn"].kl_divergence


@pytest.mark.parametrize("scheme,algo,bound", [("w8a16", "rtn", 0.01), ("w8a8", "smoothquant", 0.01),
                                               ("fp8", "rtn", 0.03)])
def test_schemes_stay_close_to_fp32(tmp_path, scheme, algo, bound):
    r = QuantRecipe(scheme=resolve_scheme(scheme), algorithm=algo, calib_samples=16, calib_seqlen=256)
    quantize_checkpoint(MODEL, tmp_path / "q", r, calib=MODEL / "calibration.txt")
    q = quality(tmp_path / "q", MODEL, TEXT, seqlen=256, max_tokens=4096)
    assert abs(q.perplexity / q.reference_perplexity - 1) < bound and 0 < q.kl_divergence


def test_kv_int8_adds_less_kl_than_w4a16_rtn(quantized, tmp_path):
    from llmc.quantized.formats import TensorQuant
    r = QuantRecipe(scheme=resolve_scheme("w8a16"), kv_cache=TensorQuant(dtype="int8"), calib_samples=16,
                    calib_seqlen=256)
    quantize_checkpoint(MODEL, tmp_path / "kv", r, calib=MODEL / "calibration.txt")
    w8 = QuantRecipe(scheme=resolve_scheme("w8a16"))
    quantize_checkpoint(MODEL, tmp_path / "w8", w8)
    kv, w8, w4 = (quality(p, MODEL, TEXT, seqlen=256, max_tokens=4096)
                  for p in (tmp_path / "kv", tmp_path / "w8", quantized / "rtn"))
    assert kv.kl_divergence - w8.kl_divergence < w4.kl_divergence, (kv.kl_divergence, w8.kl_divergence,
                                                                     w4.kl_divergence)
