"""Property-based fuzzing of the files llmc reads from a model or engine directory: random bytes and
mutations of a real safetensors file, of a shard index, of a quantized checkpoint's config and of
real engine manifests (plain and quantized), each written to a fresh directory and loaded.

Property, for every example: the reader returns a valid object or raises an LlmcError whose message
is one line; never another exception (an internal error), never a hang (each example must finish in
SECONDS, and a hard DEADLINE turns a blocked read into a failure), never a Python allocation above
PEAK_BYTES (tracemalloc peak; torch buffers are not traced, but `WeightStore.get` allocates exactly
the bytes a header entry spans, which `_read_header` bounds by the file's size).

`pytest tests/fuzz` runs the `ci` profile (200 examples per test); `--hypothesis-profile=long` 20000.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, note, settings, strategies as st
from safetensors.torch import load_file, save_file

from llmc.checkpoint import DTYPES, INDEX_FILE, WeightStore, _read_header, read_json
from llmc.compiler import compile
from llmc.engine import ENGINE_FILE, check_files, read_manifest
from llmc.errors import LlmcError
from llmc.loader import load_model
from tests.helpers import STORIES
from tests.test_file_validation import no_hang

SECONDS = 2.0                    # per example, measured
DEADLINE = 20                    # seconds: a blocked example is interrupted and fails
PEAK_BYTES = 64 << 20            # tracemalloc peak per example

GOLDEN = (STORIES / "model.safetensors").read_bytes()
HEADER_LEN = int.from_bytes(GOLDEN[:8], "little")
HEADER = json.loads(GOLDEN[8:8 + HEADER_LEN])
DATA = GOLDEN[8 + HEADER_LEN:]

# Hypothesis may not share function-scoped fixtures between examples; the module fixtures below
# are built once and only read (each example writes into its own TemporaryDirectory).
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------ the property

class Blocked(Exception):
    pass


@contextmanager
def deadline(seconds: int):
    def expire(signum, frame):
        raise Blocked(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _gist(message: str) -> str:
    """The kind of a refusal: its message without the path and quoted values."""
    return " ".join([w for w in message.split(": ", 1)[-1].split() if w.isalpha()][:5])


def holds(fn):
    """fn() returns, or raises an LlmcError with a one-line message; fast and with a bounded peak."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with deadline(DEADLINE):
            result = fn()
    except LlmcError as e:
        text = str(e)
        assert text and "\n" not in text, repr(text)
        event(f"{type(e).__name__}: {_gist(text)}")       # --hypothesis-show-statistics: what was refused
        result = e
    else:
        event("accepted")
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    assert peak < PEAK_BYTES, f"allocated {peak} bytes"
    return result


# ---------------------------------------------------------------------------------- the mutations

SPECIAL_INTS = [-1, 0, 1, 2, 7, 255, 2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
                -2**63, 10**30]
PATHS = ["", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "a/../../b", "sub/", "model.safetensors",
         "weights.safetensors", "engine.json", "tokenizer.json", "x\x00y", "a" * 300, "~", "..\\x", "./config.json"]
NAMES = sorted(DTYPES) + ["int8", "int4", "fp8_e4m3", "channel", "group", "tensor", "token", "llmc", "gptq", "cpu"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(SPECIAL_INTS), st.floats(),
                    st.text(max_size=12), st.sampled_from(PATHS), st.sampled_from(NAMES))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=8)


def neighbours(v):
    """Values near `v`: off by one, of the wrong type, emptied, wrapped."""
    if isinstance(v, bool):
        return st.sampled_from([not v, int(v), None, str(v).lower()])
    if isinstance(v, int):
        return st.sampled_from([v - 1, v + 1, -v, v * 2, v // 2, 0, float(v), str(v), [v], True, None, v + 2**32,
                                v * 2**40])
    if isinstance(v, float):
        return st.sampled_from([-v, v * 2, int(v) if math.isfinite(v) else 0, 0.0, math.inf, math.nan, str(v)])
    if isinstance(v, str):
        return st.sampled_from(["", v + "x", v[:-1], v.upper(), "../" + v, "/" + v, v + "/..", 0, [v], None])
    if isinstance(v, list):
        return st.sampled_from([[], v[:-1], v + v[-1:], v[::-1], v * 2, {"0": v}, None])
    if isinstance(v, dict):
        return st.sampled_from([{}, list(v.values()), list(v), None, {**v, "extra": 1}])
    return json_values


@st.composite
def mutated(draw, doc, edits: int = 3):
    """`doc` (parsed JSON) with 1..edits random edits, each somewhere in the tree: a value replaced by
    a neighbour or a random value, a key or element deleted, or one inserted."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, edits))):
        parent, key, node, path = None, None, doc, []
        while isinstance(node, (dict, list)) and node and (parent is None or draw(st.integers(0, 3)) > 0):
            k = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
            parent, key, node = node, k, node[k]
            path.append(k)
        op = draw(st.sampled_from(["replace", "replace", "delete", "insert"]))
        if parent is None or op == "insert":
            target, path = (parent, path[:-1]) if parent is not None else (doc, path)
            if isinstance(target, dict):
                k, v = draw(st.text(max_size=8) | st.sampled_from(list(target) or ["x"])), draw(json_values)
                target[k] = v
            elif isinstance(target, list):
                k, v = draw(st.integers(0, len(target))), draw(json_values)
                target.insert(k, v)
            else:
                continue
            note(f"insert {path + [k]} = {v!r}"[:300])
        elif op == "replace":
            parent[key] = draw(st.one_of(neighbours(node), json_values))
            note(f"replace {path} = {parent[key]!r}"[:300])
        else:
            del parent[key]
            note(f"delete {path}")
    return doc


@st.composite
def byte_edits(draw, raw: bytes, max_edits: int = 4):
    """`raw` with a few bytes replaced, inserted or deleted."""
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, max_edits))):
        i = draw(st.integers(0, max(len(b) - 1, 0)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set" and b:
            b[i] = draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif b:
            del b[i]
    return bytes(b)


def safetensors_bytes(header: bytes, data: bytes, length: int | None = None) -> bytes:
    n = len(header) if length is None else length
    return n.to_bytes(8, "little") + header + data


tails = st.sampled_from(["same", "truncated", "extended", "empty"])


def with_tail(data: bytes, tail: str) -> bytes:
    return {"same": data, "truncated": data[: len(data) // 2], "extended": data + bytes(64), "empty": b""}[tail]


def read_every_tensor(path: Path) -> None:
    """Open a safetensors file and read each tensor, which must have its header's shape."""
    store = WeightStore.open_files(path.parent, [path.name])
    for name in store.names():
        t = store.get(name)
        assert tuple(t.shape) == store.shape(name)


# ------------------------------------------------------------------------------ safetensors headers

@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_as_a_safetensors_file(raw):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "model.safetensors"
        f.write_bytes(raw)
        holds(lambda: _read_header(f))


@FUZZ
@given(st.one_of(st.none(), st.integers(0, 2**64 - 1), st.sampled_from([i for i in SPECIAL_INTS if 0 <= i < 2**64])),
       st.one_of(st.binary(max_size=512), json_values.map(lambda v: json.dumps(v).encode())),
       st.binary(max_size=64))
def test_random_header_with_a_length_prefix(length, header, data):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "model.safetensors"
        f.write_bytes(safetensors_bytes(header, data, length))
        holds(lambda: read_every_tensor(f))


@FUZZ
@given(mutated(HEADER), tails)
def test_mutated_golden_header(header, tail):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "model.safetensors"
        f.write_bytes(safetensors_bytes(json.dumps(header).encode(), with_tail(DATA, tail)))
        holds(lambda: read_every_tensor(f))


@FUZZ
@given(byte_edits(GOLDEN[8:8 + HEADER_LEN]), st.booleans())
def test_byte_edited_golden_header(header, keep_length):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "model.safetensors"
        f.write_bytes(safetensors_bytes(header, DATA, HEADER_LEN if keep_length else None))
        holds(lambda: read_every_tensor(f))


@FUZZ
@given(st.one_of(st.binary(max_size=1024), json_values.map(lambda v: json.dumps(v).encode()),
                 st.integers(1, 5000).map(lambda d: b'{"a": ' + b"[" * d + b"]" * d + b"}"),
                 mutated(json.loads((STORIES / "config.json").read_text())).map(lambda v: json.dumps(v).encode())))
def test_random_json_file(raw):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "config.json"
        f.write_bytes(raw)
        result = holds(lambda: read_json(f, "config.json"))
        assert isinstance(result, (dict, LlmcError))


# ------------------------------------------------------------------------------ directories: fixtures

def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """dst holds hard links to src's files (cheap; the examples only read them) but `skip`."""
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip:
            os.link(f, dst / f.name)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The golden model as two shards and an index."""
    out = tmp_path_factory.mktemp("sharded") / "m"
    shutil.copytree(STORIES, out, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(STORIES / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / shard))
        weight_map.update({n: shard for n in part})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def w4a16(stories_w4a16):
    return stories_w4a16


@pytest.fixture(scope="module")
def engines(tmp_path_factory, stories_engine, w4a16) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    compile(w4a16, root / "w4a16.engine")
    return {"fp32": stories_engine, "w4a16": root / "w4a16.engine"}


def run_briefly(model) -> None:
    """One short forward pass of a model that loaded (its kernels read what the loader accepted)."""
    from tests.helpers import forward_all
    logits = forward_all(model, [1, 2, 3])
    assert logits.shape == (3, model.arch.vocab_size)


# -------------------------------------------------------------------------------------- directories

@FUZZ
@given(data=st.data())
def test_mutated_shard_index(sharded, data):
    index = json.loads((sharded / INDEX_FILE).read_text())
    doc = data.draw(st.one_of(mutated(index), mutated(index["weight_map"]).map(lambda w: {"weight_map": w})))
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "m"
        link_tree(sharded, m, skip=(INDEX_FILE,))
        (m / INDEX_FILE).write_text(json.dumps(doc))
        holds(lambda: WeightStore.open(m))
        holds(lambda: load_model(m))


@FUZZ
@given(data=st.data())
def test_mutated_quantized_checkpoint(w4a16, data):
    """The quantization_config section of config.json, or the header of the first shard."""
    cfg = json.loads((w4a16 / "config.json").read_text())
    shard = sorted(w4a16.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    what = data.draw(st.sampled_from(["section", "entry", "header"]))
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "m"
        if what != "header":
            link_tree(w4a16, m, skip=("config.json",))
            q = cfg["quantization_config"]
            if what == "section":
                q = data.draw(mutated(q, edits=2))
            else:                                       # one weight's entry: its format, activation, shape
                name = data.draw(st.sampled_from(sorted(q["weights"])))
                q = {**q, "weights": {**q["weights"], name: data.draw(mutated(q["weights"][name], edits=2))}}
            (m / "config.json").write_text(json.dumps({**cfg, "quantization_config": q}))
        else:
            link_tree(w4a16, m, skip=(shard.name,))
            header = data.draw(mutated(json.loads(raw[8:8 + n]), edits=2))
            (m / shard.name).write_bytes(safetensors_bytes(json.dumps(header).encode(), raw[8 + n:]))
        model = holds(lambda: load_model(m))
        if not isinstance(model, LlmcError):
            holds(lambda: run_briefly(model))


KINDS = ("fifo", "directory", "symlink outside", "symlink loop", "dangling symlink", "empty", "hard link outside")


def replace_with(f: Path, kind: str, outside: Path) -> None:
    """Put a file of `kind` where `f` was."""
    if os.path.lexists(f):
        f.unlink()
    secret = outside / "secret"
    secret.write_bytes(b"private\n")
    {"fifo": lambda: os.mkfifo(f), "directory": lambda: f.mkdir(), "symlink outside": lambda: f.symlink_to(secret),
     "symlink loop": lambda: f.symlink_to(f.name), "dangling symlink": lambda: f.symlink_to("nowhere"),
     "empty": lambda: f.write_bytes(b""), "hard link outside": lambda: os.link(secret, f)}[kind]()


@FUZZ
@given(st.data())
def test_any_file_of_any_kind(sharded, engines, data):
    """Any file of a checkpoint or engine (or a name llmc looks for) replaced by a FIFO, a directory,
    a symlink out of the directory or in a loop, nothing, an empty file: refused, never followed."""
    src = data.draw(st.sampled_from([sharded, engines["fp32"], engines["w4a16"]]))
    names = sorted({p.name for p in src.iterdir()} | {"config.json", "tokenizer.json", "tokenizer.model"})
    name, kind = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(KINDS))
    with tempfile.TemporaryDirectory() as d:
        m, outside = Path(d) / "m", Path(d) / "outside"
        outside.mkdir()
        link_tree(src, m)
        replace_with(m / name, kind, outside)
        holds(lambda: no_hang(lambda: load_model(m), [m / name]))


@FUZZ
@given(data=st.data())
def test_mutated_engine_manifest(engines, data):
    kind = data.draw(st.sampled_from(sorted(engines)))
    src = engines[kind]
    manifest = json.loads((src / ENGINE_FILE).read_text())
    section = data.draw(st.sampled_from([None, "files", "target", "dtype", "schema_version", "quantization",
                                         "passes"]))
    if section is None or section not in manifest:
        doc = data.draw(mutated(manifest))
    else:
        doc = {**manifest, section: data.draw(mutated({"v": manifest[section]}, edits=2)).get("v")}
    with tempfile.TemporaryDirectory() as d:
        e = Path(d) / "e"
        link_tree(src, e, skip=(ENGINE_FILE,))
        (e / ENGINE_FILE).write_text(json.dumps(doc))

        def manifest_and_files():
            m = read_manifest(e)
            check_files(e, m)
        holds(manifest_and_files)
        model = holds(lambda: load_model(e))
        if not isinstance(model, LlmcError):
            holds(lambda: run_briefly(model))
