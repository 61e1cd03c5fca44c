"""`--calib-seed`: calibration samples drawn at random (windows at a random offset, a random subset)
instead of the first ones. Without a seed nothing changes; a seed gives the same draw every time,
another seed another one, and the recipe and the provenance record it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmc.bench.quality import quality
from llmc.calibration import load_calibration
from llmc.passes.quant.algorithms import with_defaults
from llmc.errors import ConfigError, ModelFormatError, OptionError
from llmc.profiles import load_profile
from llmc.quantized.scheme import QuantRecipe, recipe_from_options
from llmc.tokenizer import Tokenizer
from tests.helpers import GOLDEN, STORIES

TEXT = GOLDEN / "tinystories_valid_head.txt"
SEQLEN = 64


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(STORIES)


@pytest.fixture(scope="module")
def stream(tok):
    return tok._need().encode(TEXT.read_text(encoding="utf-8").replace("\r\n", "\n"), add_special_tokens=False).ids


def windows_at(stream: list[int], start: int, width: int) -> list[tuple[int, ...]]:
    return [tuple(stream[i:i + width]) for i in range(start, len(stream), width)]


def draw(tok, samples: int, seed: int | None, path=TEXT, seqlen=SEQLEN):
    return load_calibration(tok, path, samples, seqlen, seed=seed)


def jsonl(tmp_path, n: int):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"Once upon a time there were {i} cats."}) + "\n\n" for i in range(n)))
    return p


# ---- load_calibration ----------------------------------------------------------------------------

def test_without_a_seed_the_first_consecutive_windows(tok, stream):
    bos, width = tok.info.bos_token_id, SEQLEN - 1
    data = draw(tok, 8, None)
    assert data.samples == [[bos, *w] for w in windows_at(stream, 0, width)[:8]]
    assert data.provenance["seed"] is None and data.provenance["samples"] == 8


def test_without_a_seed_the_first_records(tok, tmp_path):
    data = draw(tok, 3, None, path=jsonl(tmp_path, 10))
    body = tok._need().encode
    assert data.samples == [[tok.info.bos_token_id, *body(f"Once upon a time there were {i} cats.",
                                                        add_special_tokens=False).ids] for i in range(3)]


def test_a_seed_draws_windows_at_one_offset_a_random_subset(tok, stream):
    width = SEQLEN - 1
    data = draw(tok, 8, 7)
    bodies = [tuple(s[1:]) for s in data.samples]
    assert all(s[0] == tok.info.bos_token_id for s in data.samples) and len(set(bodies)) == 8
    starts = [start for start in range(width) if set(bodies) <= set(windows_at(stream, start, width))]
    assert len(starts) == 1 and data.provenance["seed"] == 7
    first = windows_at(stream, starts[0], width)[:8]
    assert bodies != first                                        # not just the first windows at that offset


def test_a_seed_draws_the_same_every_time(tok, tmp_path):
    assert draw(tok, 8, 3) == draw(tok, 8, 3)
    assert draw(tok, 4, 3, path=jsonl(tmp_path, 20)) == draw(tok, 4, 3, path=jsonl(tmp_path, 20))


def test_other_seeds_draw_other_samples(tok, tmp_path):
    assert len({str(draw(tok, 8, seed).samples) for seed in range(20)}) == 20
    records = jsonl(tmp_path, 20)
    assert len({str(draw(tok, 4, seed, path=records).samples) for seed in range(20)}) == 20


def test_fewer_windows_than_samples_gives_all_of_them_shuffled(tok, stream):
    width = 1000 - 1
    data = draw(tok, 10_000, 5, seqlen=1000)
    bodies = [tuple(s[1:]) for s in data.samples]
    start = next(start for start in range(width) if bodies[0] in windows_at(stream, start, width))
    every = windows_at(stream, start, width)
    assert sorted(bodies) == sorted(every) and bodies != every and data.provenance["samples"] == len(every)


def test_a_seeded_jsonl_draw_is_a_subset_of_the_records(tok, tmp_path):
    records = jsonl(tmp_path, 20)
    every = [tuple(s) for s in draw(tok, 20, None, path=records).samples]
    some = [tuple(s) for s in draw(tok, 4, 1, path=records).samples]
    assert len(set(some)) == 4 and set(some) <= set(every) and some != every[:4]
    everything = [tuple(s) for s in draw(tok, 50, 1, path=records).samples]
    assert sorted(everything) == sorted(every) and everything != every        # all of them, shuffled


def test_a_seeded_draw_of_a_text_shorter_than_a_window(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("Once upon a time.")
    assert draw(tok, 4, 9, path=p).samples[0][0] == tok.info.bos_token_id
    p.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        draw(tok, 4, 9, path=p)


# ---- the recipe and profiles -------------------------------------------------------------------------

def test_the_recipe_records_the_seed_and_round_trips():
    r = recipe_from_options("w4a16", algo="gptq", calib_seed=1)
    assert r.calib_seed == 1 and r.to_dict()["calib_seed"] == 1
    assert QuantRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert recipe_from_options("w4a16").calib_seed is None
    old = recipe_from_options("w4a16").to_dict()
    del old["calib_seed"]                                         # a checkpoint written before the option
    assert QuantRecipe.from_dict(old).calib_seed is None


@pytest.mark.parametrize("value, needle", [(-1, "calib_seed: must be at least 0, got -1"),
                                           (True, "calib_seed: must be int, got True"),
                                           ("1", "calib_seed: must be int, got '1'")])
def test_a_bad_seed_is_an_option_error(value, needle):
    with pytest.raises(OptionError) as e:
        recipe_from_options("w4a16", calib_seed=value)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value, needle", [(-1, "calib_seed: must be at least 0, got -1"),
                                           ("1", "calib_seed is '1', not int")])
def test_a_stored_bad_seed_is_a_model_format_error(value, needle):
    d = {**recipe_from_options("w4a16").to_dict(), "calib_seed": value}
    with pytest.raises(ModelFormatError, match=needle):
        QuantRecipe.from_dict(d)


def test_a_profile_sets_the_seed(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[quantize]\nscheme = "w4a16"\ncalib_seed = 3\n')
    assert load_profile(str(p)).section("quantize")["calib_seed"] == 3
    p.write_text('[quantize]\ncalib_seed = "3"\n')
    with pytest.raises(ConfigError, match="calib_seed must be int"):
        load_profile(str(p))


# ---- llmc quantize ---------------------------------------------------------------------------

def llmc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


GPTQ = ("--scheme", "w4a16", "--algo", "gptq", "--group-size", "32", "--calib-samples", "16", "--calib-seqlen", "128")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    for seed in (1, 2):
        r = llmc("quantize", STORIES, "-o", root / f"s{seed}", *GPTQ, "--calib-seed", seed)
        assert r.returncode == 0, r.stderr
    return root


def test_two_seeds_give_other_weights_and_about_the_same_perplexity(seeded):
    a, b = (load_file(str(seeded / f"s{s}" / "model-00001-of-00006.safetensors")) for s in (1, 2))   # layer 0
    packed = [k for k in a if k.endswith(".qdata")]
    assert len(packed) == 7 and all(not torch.equal(a[k], b[k]) for k in packed)      # GPTQ saw other Hessians
    ppl = [quality(seeded / f"s{s}", STORIES, TEXT, seqlen=128, max_tokens=3000).perplexity for s in (1, 2)]
    assert abs(ppl[0] / ppl[1] - 1) < 0.03, ppl


def test_the_checkpoint_records_the_seed(seeded):
    for seed in (1, 2):
        q = json.loads((seeded / f"s{seed}" / "config.json").read_text())["quantization_config"]
        assert q["recipe"]["calib_seed"] == seed and q["calibration"]["seed"] == seed
        assert QuantRecipe.from_dict(q["recipe"]) == with_defaults(recipe_from_options(
            "w4a16", algo="gptq", group_size=32, calib_samples=16, calib_seqlen=128, calib_seed=seed))


def test_a_negative_seed_exits_2_with_one_line(tmp_path):
    r = llmc("quantize", STORIES, "-o", tmp_path / "q", *GPTQ, "--calib-seed", "-1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == "error: --calib-seed: must be at least 0, got -1"
    assert not (tmp_path / "q").exists()


def test_rtn_accepts_a_seed_it_does_not_use(tmp_path):
    r = llmc("quantize", STORIES, "-o", tmp_path / "q", "--scheme", "w4a16", "--calib-seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["recipe"]["calib_seed"] == 1 and out["calibration"] is None
