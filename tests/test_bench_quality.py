"""`bench quality` against a number measured independently of llmc, and on quantized models."""
from __future__ import annotations

import json
import math

import pytest

from llmc.bench.quality import quality
from llmc.cli import main
from llmc.errors import ConfigError, OptionError
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
    r = json.loads(out.read_text())
    assert r["schema"] == "llmc.bench.result/1" and r["kind"] == "quality"
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert {"perplexity", "reference_perplexity", "kl_divergence", "top1_agreement", "tokens", "bytes_on_disk"} <= set(m)
    assert m["tokens"] == 1000 and "top-1 agree" in capsys.readouterr().out
    assert r["model"]["recipe"]["scheme"]["name"] == "w8a16" and r["model"]["bytes_on_disk"] == m["bytes_on_disk"]
    assert r["config"]["kl"] == "exact" and len(r["config"]["text_sha256"]) == 64
    windows = r["samples"]["windows"]                      # every metric recomputed from the windows' sums
    assert sum(w["tokens"] for w in windows) == 1000 and len({w["id"] for w in windows}) == len(windows) == 8
    assert m["perplexity"] == pytest.approx(math.exp(sum(w["nll"] for w in windows) / 1000), rel=1e-12)
    assert m["kl_divergence"] == pytest.approx(sum(w["kl"] for w in windows) / 1000, rel=1e-12)
    assert m["top1_agreement"] == sum(w["agree"] for w in windows) / 1000
    for key in ("backend", "reference_backend"):           # what ran: target, device, kernels, per op
        b = r["details"][key]
        assert b["target"] == "cpu" and b["device"] == "cpu" and b["kernels"] == "native"   # the default for models it runs
        assert sum(b["ops"]["linear"]["variants"].values()) > 0


def test_saved_reference_logits_give_the_reference_numbers(quantized, tmp_path):
    """With k = the vocabulary (512) the saved top-k is the whole distribution: every number is the
    live reference's; with k = 8, KL over top-8 + tail is a lower bound close to the full KL."""
    model, kw = quantized["w4a16"], dict(seqlen=128, max_tokens=2000)
    full, small = tmp_path / "ref512.safetensors", tmp_path / "ref8.safetensors"
    live = quality(model, STORIES, TEXT, save_reference=full, top_k=512, **kw)
    quality(model, STORIES, TEXT, save_reference=small, top_k=8, **kw)
    saved = quality(model, None, TEXT, reference_logits=full, **kw)
    assert (saved.perplexity, saved.reference_perplexity, saved.top1_agreement) == \
        (live.perplexity, pytest.approx(live.reference_perplexity, rel=1e-6), live.top1_agreement)
    assert saved.kl_divergence == pytest.approx(live.kl_divergence, rel=1e-4)
    assert [w["id"] for w in saved.records] == [w["id"] for w in live.records]
    assert (live.config["kl"], saved.config["kl"]) == ("exact", "top512+tail")
    approx = quality(model, None, TEXT, reference_logits=small, **kw)
    assert 0.8 * live.kl_divergence < approx.kl_divergence <= live.kl_divergence * (1 + 1e-6)
    assert small.stat().st_size < full.stat().st_size / 20               # compact: the top-8, not the vocabulary


def test_saved_reference_logits_refuse_another_protocol(quantized, tmp_path, capsys):
    model, saved = quantized["w8a16"], tmp_path / "ref.safetensors"
    quality(model, STORIES, TEXT, seqlen=128, max_tokens=500, save_reference=saved, top_k=4)
    with pytest.raises(ConfigError, match="saved for another seqlen"):
        quality(model, None, TEXT, seqlen=64, max_tokens=500, reference_logits=saved)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.read_text()[1000:])
    with pytest.raises(ConfigError, match="saved for another text"):
        quality(model, None, other, seqlen=128, max_tokens=500, reference_logits=saved)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for args, needle in ((["--reference-logits", str(tmp_path / "junk.safetensors")], "not a reference logits file"),
                         ([], "--reference: give the reference model"),
                         (["--reference", str(STORIES), "--reference-logits", str(saved)], "one of the two")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "quality", str(model), "--text", str(TEXT), *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such text file"):
        quality(STORIES, STORIES, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        quality(STORIES, STORIES, tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match="seqlen"):
        quality(STORIES, STORIES, TEXT, seqlen=4096)


def test_save_reference_refuses_a_foreign_file_before_any_work(tmp_path, monkeypatch):
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"not llmc's")

    def no_work(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr("llmc.loader.load_model", no_work)
    with pytest.raises(ConfigError, match="was not written by llmc"):
        quality(STORIES, STORIES, TEXT, save_reference=mine)
    assert mine.read_bytes() == b"not llmc's"


def test_llama_perplexity_protocol_gives_llama_cpps_number():
    """`--protocol llama-perplexity` cuts and scores as llama.cpp's llama-perplexity: on the golden
    model's GGUF (stories260K.gguf, f32), `llama-perplexity -c 256 -f tinystories_valid_head.txt`
    printed 74 chunks and `Final estimate: PPL = 3.9242`."""
    r = quality(STORIES, STORIES, TEXT, seqlen=256, protocol_name="llama-perplexity")
    assert r.windows == 74 and r.tokens == 74 * 127                     # positions 128..254 of each chunk
    assert r.perplexity == pytest.approx(3.9242, abs=5e-5)
    assert r.config["protocol"] == "llama-perplexity"


def test_protocols_cut_the_text_as_documented():
    from llmc.bench.quality import consecutive_windows, llama_perplexity_chunks

    stream = list(range(10, 30))                                        # 20 text tokens, BOS = 1
    assert [(ids[:2], first) for ids, first in consecutive_windows(stream, 8, 1)] == \
        [([1, 10], 0), ([1, 17], 0), ([1, 24], 0)]                      # 7 text tokens a window
    chunks = list(llama_perplexity_chunks(stream, 8, 1))                # BOS + 20 = 21 tokens: 2 chunks of 8
    assert chunks == [([1, 10, 11, 12, 13, 14, 15, 16], 4), ([1, 18, 19, 20, 21, 22, 23, 24], 4)]
    with pytest.raises(OptionError, match="unknown protocol 'nope'"):
        quality(STORIES, STORIES, TEXT, protocol_name="nope")
