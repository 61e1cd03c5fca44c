"""Fuzz the architecture and tokenizer config readers: random JSON values and mutations of the golden
configs give a valid object or a one-line LlmcError; never another exception, a hang or a large
allocation. `parse_arch` (config.json), `ArchConfig.from_dict` (an engine manifest) and `Tokenizer`
(config.json, generation_config.json, tokenizer_config.json in a directory)."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

from hypothesis import event, given, strategies as st

from llmc.arch import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS,
                       MAX_VOCAB, ArchConfig, parse_arch)
from llmc.errors import LlmcError
from llmc.tokenizer import Tokenizer
from tests.helpers import GOLDEN, STORIES

MAX_SECONDS = 1.0                 # per call; parse_arch itself takes microseconds
MAX_BYTES = 50 << 20              # traced peak per call
# Tokenizer reads its JSON files with llmc.checkpoint.read_json; the transient buffer that reader may
# hold (up to its own size limit) is not this file's subject, so it gets its own allowance.
TOKENIZER_MAX_BYTES = MAX_BYTES + (64 << 20)

GOLDEN_CONFIGS = [json.loads((GOLDEN / name / "config.json").read_text()) for name in ("stories260K", "stdlib-llama")]
GOLDEN_ARCH = [parse_arch(cfg).to_dict() for cfg in GOLDEN_CONFIGS]
CONFIG_KEYS = sorted({k for cfg in GOLDEN_CONFIGS for k in cfg} | {
    "rope_scaling", "rope_theta", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "partial_rotary_factor", "quantization_config"})
ROPE_KEYS = ["rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "partial_rotary_factor"]
TOKEN_KEYS = ["bos_token_id", "eos_token_id", "bos_token", "eos_token", "add_bos_token", "add_eos_token",
              "pad_token_id"]

# Numbers at and around the bounds, and the usual troublemakers.
EDGES = sorted({0, 1, 2, 3, 7, 8, 64, 511, 512, 513, 2**31, 2**63, 10**18} |
               {b + d for b in (MAX_LAYERS, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_VOCAB,
                                MAX_POSITIONS) for d in (-1, 0, 1)})
NUMBERS = st.one_of(
    st.sampled_from(EDGES), st.sampled_from(EDGES).map(lambda n: -n), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300,
                                                                     1e308, 2.5, 5.0, 10**400, -10**400]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12),
                    st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "silu", "default", "linear", "llama3",
                                     "yarn", "full_attention", "sliding_attention", "5", "yes", "<s>", "</s>",
                                     "\ud800", "a\nb"]))


def _json(leaves: st.SearchStrategy) -> st.SearchStrategy:
    def containers(inner: st.SearchStrategy) -> st.SearchStrategy:
        return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    return st.recursive(leaves, containers, max_leaves=12)


def _nest(depth: int, leaf):
    for level in range(depth):
        leaf = [leaf] if level % 2 else {"a": leaf}
    return leaf


JSON = _json(SCALARS)
DEEP = st.builds(_nest, st.integers(10, 3000), SCALARS)          # in memory only: deeper than json.loads allows
ROPE = st.one_of(
    st.dictionaries(st.sampled_from(ROPE_KEYS), st.one_of(SCALARS, JSON), max_size=6),
    st.fixed_dictionaries(                      # mostly plausible, so that the llama3 / linear paths are reached
        {"rope_type": st.sampled_from(["default", "linear", "llama3"])},
        optional={"rope_theta": st.sampled_from([1e4, 5e5]) | NUMBERS, "factor": st.sampled_from([8.0, 2]) | NUMBERS,
                  "low_freq_factor": st.sampled_from([1.0, 4.0]) | NUMBERS,
                  "high_freq_factor": st.sampled_from([4.0, 1.0]) | NUMBERS,
                  "original_max_position_embeddings": st.sampled_from([8192, 0]) | NUMBERS}))
VALUES = st.one_of(SCALARS, JSON, DEEP, ROPE, st.lists(st.sampled_from(["full_attention", "sliding_attention"]),
                                                       max_size=8))


def within_bounds(call, *args, max_bytes: int = MAX_BYTES):
    """call(*args): the result, or the LlmcError it raised (one line); bounded in time and memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = call(*args)
    except LlmcError as e:
        result = e
    finally:
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < MAX_SECONDS, f"{seconds:.2f} s"
    assert peak < max_bytes, f"{peak} bytes"
    event(type(result).__name__)                     # --hypothesis-show-statistics: how often each outcome
    if isinstance(result, LlmcError):
        text = str(result)
        assert text and len(text.splitlines()) == 1 and len(text) < 1000, text
    return result


def check_arch(arch: ArchConfig) -> None:
    """What every ArchConfig that comes out must satisfy."""
    assert 1 <= arch.num_layers <= MAX_LAYERS and len(arch.sliding_windows) == arch.num_layers
    assert 1 <= arch.num_kv_heads <= arch.num_heads <= MAX_HEADS and arch.num_heads % arch.num_kv_heads == 0
    assert 2 <= arch.head_dim <= MAX_HEAD_DIM and arch.head_dim % 2 == 0
    assert 1 <= arch.hidden_size <= MAX_HIDDEN and 1 <= arch.intermediate_size <= MAX_INTERMEDIATE
    assert 1 <= arch.vocab_size <= MAX_VOCAB and 1 <= arch.max_position_embeddings <= MAX_POSITIONS
    assert all(w is None or (type(w) is int and 1 <= w <= MAX_POSITIONS) for w in arch.sliding_windows)
    r = arch.rope
    for x in (arch.rms_norm_eps, r.theta, r.factor, r.low_freq_factor, r.high_freq_factor):
        assert type(x) is float and math.isfinite(x) and x > 0
    for flag in (arch.tie_word_embeddings, arch.qkv_bias, arch.o_bias, arch.mlp_bias, arch.qk_norm):
        assert type(flag) is bool
    assert ArchConfig.from_dict(arch.to_dict()) == arch


@st.composite
def mutated(draw, bases: list[dict], keys: list[str], edits: tuple[int, int] = (1, 5)) -> dict:
    """A base dict with a few keys dropped or replaced by any JSON value (or a value near a bound)."""
    d = dict(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(*edits))):
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["drop", "replace", "replace", "family"]))
        if action == "drop":
            d.pop(key, None)
        elif action == "family":
            d["model_type"] = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
        else:
            d[key] = draw(VALUES)
    return d


@given(mutated(GOLDEN_CONFIGS, CONFIG_KEYS))
def test_parse_arch_on_mutated_golden_configs(cfg):
    result = within_bounds(parse_arch, cfg)
    if isinstance(result, ArchConfig):
        check_arch(result)


@given(st.one_of(JSON, DEEP, st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, max_size=12)))
def test_parse_arch_on_random_values(cfg):
    result = within_bounds(parse_arch, cfg)
    if isinstance(result, ArchConfig):
        check_arch(result)


@st.composite
def mutated_manifest(draw) -> dict:
    d = draw(mutated(GOLDEN_ARCH, sorted(GOLDEN_ARCH[0]) + ["num_experts"], edits=(0, 3)))
    if draw(st.booleans()) and isinstance(d.get("rope"), dict):
        d["rope"] = draw(mutated([d["rope"]], sorted(d["rope"]) + ["beta_fast"], edits=(0, 2)))
    if draw(st.booleans()) and isinstance(d.get("sliding_windows"), list):
        windows = list(d["sliding_windows"])
        if windows:
            windows[draw(st.integers(0, len(windows) - 1))] = draw(SCALARS)
        d["sliding_windows"] = windows
    return d


@given(st.one_of(mutated_manifest(), JSON, DEEP))
def test_from_dict_on_mutated_manifests(d):
    result = within_bounds(ArchConfig.from_dict, d)
    if isinstance(result, ArchConfig):
        check_arch(result)


TOKENIZER_FILES = {"config.json": json.loads((STORIES / "config.json").read_text()),
                   "generation_config.json": json.loads((STORIES / "generation_config.json").read_text()),
                   "tokenizer_config.json": json.loads((STORIES / "tokenizer_config.json").read_text())}
# Written to files: no DEEP nesting (json.loads' recursion limit is llmc.checkpoint.read_json's to handle).
FILE_VALUES = st.one_of(SCALARS, _json(SCALARS))


@st.composite
def tokenizer_dir_files(draw) -> dict[str, object]:
    """Contents for each of the three JSON files (a value, or None: the file is absent)."""
    files = {}
    for name, base in TOKENIZER_FILES.items():
        how = draw(st.sampled_from(["keep", "mutate", "mutate", "mutate", "absent", "any"]))
        if how == "absent":
            files[name] = None
        elif how == "any":
            files[name] = draw(FILE_VALUES)
        else:
            d = dict(base)
            for _ in range(draw(st.integers(0, 4)) if how == "mutate" else 0):
                key = draw(st.sampled_from(TOKEN_KEYS))
                if draw(st.booleans()):
                    d.pop(key, None)
                else:
                    d[key] = draw(st.one_of(FILE_VALUES, st.lists(st.integers(-3, 600), max_size=4),
                                            st.integers(-3, 600), st.builds(dict, content=FILE_VALUES)))
            files[name] = d
    return files


@given(tokenizer_dir_files(), st.booleans())
def test_tokenizer_on_mutated_files(files, with_tokenizer_json):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if with_tokenizer_json:
            shutil.copyfile(STORIES / "tokenizer.json", d / "tokenizer.json")
        for name, value in files.items():
            if value is not None:
                (d / name).write_text(json.dumps(value))
        result = within_bounds(Tokenizer, d, max_bytes=TOKENIZER_MAX_BYTES)
    if isinstance(result, Tokenizer):
        info, vocab = result.info, 512 if with_tokenizer_json else MAX_VOCAB
        assert all(type(i) is int and 0 <= i < vocab for i in info.eos_token_ids)
        assert info.bos_token_id is None or (type(info.bos_token_id) is int and 0 <= info.bos_token_id < vocab)
        assert info.add_bos in (None, True, False) and info.add_eos in (None, True, False)
