"""`bench quality` against a number measured independently of llmc, and on quantized models."""
from __future__ import annotations

import json

import pytest

from llmc.bench.quality import quality
from llmc.cli import main
from llmc.errors import ConfigError
from tests.helpers import GOLDEN, STORIES

TEXT = GOLDEN / "tinystories_valid_head.txt"


def test_documented_perplexity_of_the_golden_model():
    """stories260K's verification: 4.2762 on the first 16,352 tokens in 511-token BOS windows."""
    r = quality(STORIES, STORIES, TEXT, seqlen=512, max_tokens=16352)
    assert (r.windows, r.tokens) == (32, 16352)
    assert r.perplexity == pytest.approx(4.2762, abs=5e-5)
    assert r.reference_perplexity == r.perplexity and r.kl_divergence == 0 and r.top1_agreement == 1


@pytest.fixture(scope="module")
def quantized(stories_w8a16, stories_w4a16):
    return {"w8a16": stories_w8a16, "w4a16": stories_w4a16}


def test_quantized_models(quantized):
    w8 = quality(quantized["w8a16"], STORIES, TEXT, seqlen=256, max_tokens=6000)
    w4 = quality(quantized["w4a16"], STORIES, TEXT, seqlen=256, max_tokens=6000)
    assert w8.tokens == w4.tokens == 6000
    assert abs(w8.perplexity / w8.reference_perplexity - 1) < 0.01              # w8a16 within 1% of fp32
    assert 0 < w8.kl_divergence < w4.kl_divergence
    assert w4.top1_agreement < w8.top1_agreement <= 1
    assert w4.perplexity > w8.perplexity


def test_cli_json(quantized, tmp_path, capsys):
    out = tmp_path / "q.json"
    main(["bench", "quality", str(quantized["w8a16"]), "--reference", str(STORIES), "--text", str(TEXT),
          "--seqlen", "128", "--max-tokens", "1000", "--json", str(out)])
    r = json.loads(out.read_text())                       # the contract: metrics at the top level
    assert {"perplexity", "reference_perplexity", "kl_divergence", "top1_agreement", "tokens"} <= set(r)
    assert r["tokens"] == 1000 and "top-1 agree" in capsys.readouterr().out
    for key in ("backend", "reference_backend"):           # what ran: target, device, kernels, per op
        assert r[key]["target"] == "cpu" and r[key]["device"] == "cpu" and r[key]["kernels"] == "native"   # the default for models it runs
        assert sum(r[key]["ops"]["linear"]["variants"].values()) > 0


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such text file"):
        quality(STORIES, STORIES, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        quality(STORIES, STORIES, tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="seqlen"):
        quality(STORIES, STORIES, TEXT, seqlen=4096)
