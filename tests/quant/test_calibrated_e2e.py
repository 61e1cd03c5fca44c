"""GPTQ and AWQ end to end on the golden model: better than RTN at the same group size."""
from __future__ import annotations

import json

import pytest

from llmc.bench.quality import quality
from llmc.errors import ConfigError
from llmc.quantizer import quantize_checkpoint
from llmc.quantized.scheme import QuantRecipe, resolve_scheme
from tests.helpers import GOLDEN, STORIES

TEXT = GOLDEN / "tinystories_valid_head.txt"


def recipe(algo, samples=16, seqlen=256):
    return QuantRecipe(scheme=resolve_scheme("w4a16", group_size=32), algorithm=algo, calib_samples=samples,
                       calib_seqlen=seqlen)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    out = {}
    for algo in ("rtn", "gptq", "awq"):
        res = quantize_checkpoint(STORIES, root / algo, recipe(algo))
        out[algo] = (res, quality(root / algo, STORIES, TEXT, seqlen=256, max_tokens=6000))
    return root, out


def test_calibrated_algorithms_beat_rtn(results):
    _, out = results
    rtn, gptq, awq = (out[a][1] for a in ("rtn", "gptq", "awq"))
    assert gptq.perplexity < rtn.perplexity and awq.perplexity < rtn.perplexity
    assert gptq.kl_divergence < rtn.kl_divergence and awq.kl_divergence < rtn.kl_divergence


def test_provenance_and_reports(results):
    root, out = results
    res = out["gptq"][0]
    assert res.calibration["samples"] == 16 and res.calibration["seqlen"] == 256
    assert len(res.calibration["sha256"]) == 64
    assert all(r.output_sqnr_db is not None and r.output_sqnr_db > 10 for r in res.layers[:-1])
    q = json.loads((root / "gptq" / "config.json").read_text())["quantization_config"]
    assert q["recipe"]["algorithm"] == "gptq" and q["calibration"]["file"].endswith("tinystories_calib.txt")


def test_awq_folds_into_norms(results):
    root, _ = results
    from llmc.loader import load_model
    a, b = load_model(root / "awq"), load_model(STORIES)
    name = "model.layers.0.input_layernorm.weight"
    assert not (a.weights.get(name) == b.weights.get(name)).all()


@pytest.mark.parametrize("content,message", [(None, "not found"), (b"", "is empty"), (b"\xff\xfe\x00bad", "unreadable"),
                                             (b'{"nope": 1}\n', "'text' field")])
def test_calibration_file_errors(tmp_path, content, message):
    calib = tmp_path / ("c.jsonl" if content and content.startswith(b"{") else "c.txt")
    if content is not None:
        calib.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        quantize_checkpoint(STORIES, tmp_path / "out", recipe("gptq"), calib=calib)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme,algo,bound", [("w8a8", "rtn", 0.01), ("w8a8", "smoothquant", 0.01),
                                               ("fp8", "rtn", 0.03)])
def test_activation_schemes_stay_close_to_fp32(tmp_path, scheme, algo, bound):
    from llmc.inspection import inspect
    r = QuantRecipe(scheme=resolve_scheme(scheme), algorithm=algo, calib_samples=16, calib_seqlen=256)
    quantize_checkpoint(STORIES, tmp_path / "q", r)
    q = quality(tmp_path / "q", STORIES, TEXT, seqlen=256, max_tokens=6000)
    assert abs(q.perplexity / q.reference_perplexity - 1) < bound
    assert 0 < q.kl_divergence
    if scheme == "fp8":
        assert "emulated on CPU" in inspect(tmp_path / "q").quantization
