"""Fuzz the profile reader: any bytes, and mutations of the bundled profiles, give a Profile or a
one-line LlmcError; never another exception, a hang or a large allocation."""
from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

from hypothesis import given, strategies as st

from llmc.errors import LlmcError
from llmc.quantized.scheme import recipe_from_options
from llmc.profiles import PROFILE_DIR, load_profile

BUNDLED = [p.read_text() for p in sorted(PROFILE_DIR.glob("*.toml"))]
KEYS = ["scheme", "algo", "group_size", "asymmetric", "kv_cache", "calib", "calib_samples", "calib_seqlen", "alpha",
        "awq_clip", "observer", "act_observer", "percentile", "format", "target", "passes", "calib_seed",
        "confidence", "resamples", "min_samples", "default_tolerance", "metrics", "nope"]
VALUES = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(), st.text(max_size=20),
                   st.just("[1, 2]"), st.just('["a", 3]'), st.just("{ x = 1 }"), st.just('"w4a16"'),
                   st.just('"gptq"'), st.just("inf"), st.just("nan"), st.just("{ perplexity = 0.02 }"),
                   st.just("{ perplexity = { tolerance = -1 } }"), st.just("{ ppl = { tolerance = 0.1, x = 1 } }"))
MAX_SECONDS, MAX_BYTES = 1.0, 32 << 20


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v).replace("inf", "inf")
    if isinstance(v, dict):                                  # an inline table ([gate.metrics] and its rules)
        return "{ " + ", ".join(f'"{k}" = {_toml(x) if not isinstance(x, list) else _list(x)}'
                                for k, x in v.items()) + " }"
    return v if v.startswith(("[", "{", '"')) or v in ("inf", "nan") else '"' + v.replace("\\", "").replace('"', "") + '"'


def _load(text: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.toml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            prof = load_profile(str(p))
            q = prof.section("quantize")
            if "scheme" in q:
                recipe_from_options(**{k: v for k, v in q.items() if k not in ("calib", "format")})
        except LlmcError as e:
            assert "\n" not in str(e)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert time.perf_counter() - t0 < MAX_SECONDS and peak < MAX_BYTES


@given(st.binary(max_size=512))
def test_random_bytes(data):
    _load(data)


@given(st.sampled_from(BUNDLED), st.lists(st.tuples(st.sampled_from(["quantize", "compile", "gate", "x"]),
                                                    st.sampled_from(KEYS), VALUES), max_size=4),
       st.booleans())
def test_mutated_bundled_profiles(base, edits, drop):
    """Values set, replaced or dropped in a bundled profile's tables (written back as TOML)."""
    import tomllib
    data = tomllib.loads(base)
    tables = {k: dict(v) for k, v in data.items() if isinstance(v, dict)}
    for table, key, value in edits:
        tables.setdefault(table, {})[key] = value
    if drop and tables.get("quantize"):
        tables["quantize"].pop(next(iter(tables["quantize"])))
    text = "".join(f"[{t}]\n" + "".join(f"{k} = {_toml(v) if not isinstance(v, list) else _list(v)}\n"
                                        for k, v in kv.items()) for t, kv in tables.items())
    _load(text)


def _list(v: list) -> str:
    return "[" + ", ".join(_toml(x) if not isinstance(x, str) else '"' + x + '"' for x in v) + "]"
