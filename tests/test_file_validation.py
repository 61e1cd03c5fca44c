"""Files a model or engine names are resolved inside it, read only when regular, and checked before
use: every damaged or crafted file is a one-line LlmcError naming it, never a hang, an internal
error, a read outside the directory or garbage from a kernel."""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmc.checkpoint import INDEX_FILE, WeightStore, _read_header, read_json
from llmc.compiler import compile
from llmc.engine import ENGINE_FILE, WEIGHTS_FILE
from llmc.errors import EngineError, LlmcError, ModelFormatError
from llmc.io import sha256_file
from llmc.loader import load_model
from tests.helpers import STORIES


# ------------------------------------------------------------------------------------------ helpers

def checkpoint(tmp_path: Path, name: str = "m") -> Path:
    return Path(shutil.copytree(STORIES, tmp_path / name))


def copy_engine(engine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(engine, tmp_path / "copy.engine"))


def edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def relist(engine: Path, name: str) -> None:
    """Record a file's new size and sha256 in engine.json (as if the engine had been written so)."""
    f = engine / name
    edit_json(engine / ENGINE_FILE, lambda m: {**m, "files": {**m["files"], name: {
        "sha256": sha256_file(f), "bytes": f.stat().st_size}}})


def write_safetensors(path: Path, header: dict | str, data: bytes = b"") -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def one_line(e: LlmcError) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


_UNBLOCK = """
import os, sys, time
time.sleep(float(sys.argv[1]))
while True:                                    # until killed: a reader may open the FIFO again
    for f in sys.argv[2:]:
        try:
            os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    time.sleep(0.2)
"""


def no_hang(fn, fifos: list[Path], seconds: float = 10.0):
    """fn(), failing the test (instead of hanging it) if it takes `seconds`: a watchdog process then
    opens the FIFOs for writing and closes them, which unblocks a reader stuck on one (a process,
    not a thread: a reader blocked inside a native library may hold the GIL)."""
    watchdog = subprocess.Popen([sys.executable, "-c", _UNBLOCK, str(seconds), *map(str, fifos)])
    t0 = time.monotonic()
    try:
        return fn()
    finally:
        watchdog.kill()
        watchdog.wait()
        if time.monotonic() - t0 >= seconds:
            pytest.fail(f"blocked for {seconds} s reading a FIFO")


@pytest.fixture(scope="module")
def engine(stories_engine):
    return stories_engine


@pytest.fixture(scope="module")
def w4a16(stories_w4a16):
    return stories_w4a16


# ------------------------------------------------------------- 1. paths stay inside their directory

def _shard_outside(tmp_path: Path, name: str | None) -> Path:
    """A checkpoint whose only shard sits outside it, named by its index (`name`; None: the absolute path)."""
    m = checkpoint(tmp_path)
    outside = tmp_path / "outside.safetensors"
    os.replace(m / "model.safetensors", outside)
    names = load_file(outside).keys()
    (m / INDEX_FILE).write_text(json.dumps({"weight_map": {n: name or str(outside) for n in names}}))
    return m


@pytest.mark.parametrize("name", ["../outside.safetensors", None, "sub/../../outside.safetensors"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, name):
    m = _shard_outside(tmp_path, name)
    with pytest.raises(ModelFormatError, match="outside") as e:
        load_model(m)
    assert INDEX_FILE in one_line(e.value)


def test_index_naming_a_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    m = _shard_outside(tmp_path, "model-00001.safetensors")
    (m / "model-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(ModelFormatError, match="model-00001.safetensors: resolves to .*outside"):
        load_model(m)


def test_symlinked_shard_out_of_the_checkpoint_is_refused(tmp_path):
    m = checkpoint(tmp_path)
    os.replace(m / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (m / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ModelFormatError, match="model.safetensors: resolves to .*outside"):
        load_model(m)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_symlink_loop_is_a_user_error(tmp_path, name):
    m = checkpoint(tmp_path)
    (m / name).unlink()
    (m / name).symlink_to(name)                     # resolving it raised RuntimeError (an internal error)
    with pytest.raises(ModelFormatError, match=f"{name}: cannot be resolved"):
        load_model(m)


@pytest.mark.parametrize("absolute", [False, True])
def test_engine_listing_a_file_outside_it_is_refused(engine, tmp_path, absolute):
    e = copy_engine(engine, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("private\n")
    name = str(secret) if absolute else "../secret.txt"
    meta = {"sha256": sha256_file(secret), "bytes": secret.stat().st_size}
    edit_json(e / ENGINE_FILE, lambda m: {**m, "files": {**m["files"], name: meta}})
    with pytest.raises(EngineError, match="outside"):
        load_model(e)


def test_symlinked_tokenizer_model_pointing_elsewhere_is_not_copied(tmp_path):
    m = checkpoint(tmp_path)
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.model").write_bytes(b"not for the engine")
    (m / "tokenizer.model").unlink()
    (m / "tokenizer.model").symlink_to(private / "secret.model")
    with pytest.raises(ModelFormatError, match="tokenizer.model: resolves to .*outside"):
        compile(m, tmp_path / "out.engine")
    assert not (tmp_path / "out.engine").exists()


def hf_cache_snapshot(root: Path) -> Path:
    """The Hugging Face cache layout: snapshots/REV/<file> are relative symlinks into blobs/."""
    repo = root / "models--org--stories260K"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in sorted(STORIES.iterdir()):
        blob = sha256_file(f)
        shutil.copyfile(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return snap


def test_hugging_face_cache_layout_loads_and_compiles(tmp_path):
    snap = hf_cache_snapshot(tmp_path / "hub")
    assert all(p.is_symlink() for p in snap.iterdir())
    m = load_model(snap)
    assert m.kind == "hf" and m.tokenizer.encode("Once upon a time")
    out = tmp_path / "out.engine"
    compile(snap, out)
    for name in ("tokenizer.model", "tokenizer.json", "config.json"):
        f = out / name
        assert f.is_file() and not f.is_symlink() and f.read_bytes() == (STORIES / name).read_bytes()
    assert load_model(out).kind == "engine"


# ----------------------------------------------------------------- 2. regular, readable, bounded files

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_fifo_in_a_checkpoint_is_refused_without_blocking(tmp_path, name):
    m = checkpoint(tmp_path)
    (m / name).unlink()
    os.mkfifo(m / name)
    with pytest.raises(ModelFormatError, match=f"{name}: .*not a regular file"):
        no_hang(lambda: load_model(m), [m / name])


@pytest.mark.parametrize("name", [ENGINE_FILE, WEIGHTS_FILE, "tokenizer.json"])
def test_fifo_in_an_engine_is_refused_without_blocking(engine, tmp_path, name):
    e = copy_engine(engine, tmp_path)
    (e / name).unlink()
    os.mkfifo(e / name)
    with pytest.raises(EngineError, match=f"{name}: .*not a regular file"):
        no_hang(lambda: load_model(e), [e / name])


def test_directory_named_like_a_weight_file_is_refused(tmp_path):
    m = checkpoint(tmp_path)
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").mkdir()
    with pytest.raises(ModelFormatError, match="model.safetensors: weight file is a directory"):
        load_model(m)


@pytest.fixture
def deny(monkeypatch):
    """deny(path): opening `path` raises PermissionError, as for a file without read permission
    (simulated: root reads every file)."""
    denied: set[str] = set()
    real_os_open, real_open = os.open, builtins.open

    def check(p) -> None:
        if not isinstance(p, int) and os.path.abspath(os.fspath(p)) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))

    def os_open(p, *a, **k):
        check(p)
        return real_os_open(p, *a, **k)

    def b_open(p, *a, **k):
        check(p)
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", b_open)
    monkeypatch.setattr(io, "open", b_open)
    return lambda p: denied.add(os.path.abspath(p))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_unreadable_checkpoint_file_is_a_user_error(tmp_path, deny, name):
    m = checkpoint(tmp_path)
    deny(m / name)
    with pytest.raises(ModelFormatError, match=f"{name}: .*cannot be read \\(Permission denied\\)"):
        load_model(m)


@pytest.mark.parametrize("name", [ENGINE_FILE, WEIGHTS_FILE])
def test_unreadable_engine_file_is_a_user_error(engine, tmp_path, deny, name):
    e = copy_engine(engine, tmp_path)
    deny(e / name)
    with pytest.raises(EngineError, match=f"{name}: .*cannot be read \\(Permission denied\\)"):
        load_model(e)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission; "
                                              "test_unreadable_checkpoint_file_is_a_user_error simulates it")
def test_unreadable_config_really_without_permission(tmp_path):
    m = checkpoint(tmp_path)
    (m / "config.json").chmod(0)
    with pytest.raises(ModelFormatError, match="config.json: .*cannot be read"):
        load_model(m)


@pytest.mark.parametrize("depth,match", [(100_000, "nested too deeply"), (70, "nested more than 64")])
def test_deeply_nested_config_is_refused(tmp_path, depth, match):
    m = checkpoint(tmp_path)
    edit_json(m / "config.json", lambda c: c)
    text = (m / "config.json").read_text()
    (m / "config.json").write_text(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ModelFormatError, match=f"config.json: config.json is {match}"):
        load_model(m)


def test_oversized_json_is_refused_unread(tmp_path):
    f = tmp_path / "config.json"
    with open(f, "wb") as out:                     # sparse: no disk used
        out.write(b'{"a": "')
        out.truncate((64 << 20) + 1)          # the bound: 64 MiB
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match="config.json: config.json is 67108865 bytes, more than"):
            read_json(f, "config.json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ---------------------------------------------------------------------------- 3. safetensors headers

F32x1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
BAD_HEADERS = {
    "negative offsets": ({"a": {**F32x1, "data_offsets": [-4, 0]}}, "data_offsets"),
    "float offsets": ({"a": {**F32x1, "data_offsets": [0.0, 4.0]}}, "data_offsets"),
    "bool offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, "data_offsets"),
    "string offsets": ({"a": {**F32x1, "data_offsets": ["0", "4"]}}, "data_offsets"),
    "three offsets": ({"a": {**F32x1, "data_offsets": [0, 4, 8]}}, "data_offsets"),
    "begin after end": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, "data_offsets"),
    "span is not the shape": ({"a": {**F32x1, "shape": [2]}}, "holds 4 bytes, its shape \\[2\\] of F32 needs 8"),
    "negative dim": ({"a": {**F32x1, "shape": [-1, -1]}}, "shape"),
    "float dim": ({"a": {**F32x1, "shape": [1.0]}}, "shape"),
    "bool dim": ({"a": {**F32x1, "shape": [True]}}, "shape"),
    "rank 9": ({"a": {**F32x1, "shape": [1] * 9}}, "at most 8"),
    "huge dim": ({"a": {"dtype": "F32", "shape": [1 << 41, 0], "data_offsets": [0, 0]}}, "shape"),
    "overlap": ({"a": {**F32x1, "shape": [2], "data_offsets": [0, 8]},
                 "b": {**F32x1, "shape": [2], "data_offsets": [4, 12]}}, "'a' and 'b' overlap"),
    "unknown dtype": ({"a": {**F32x1, "dtype": "F17"}}, "unsupported dtype 'F17'"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "a": F32x1}, "__metadata__"),
    "duplicate name": ('{"a": %s, "a": %s}' % (json.dumps(F32x1), json.dumps(F32x1)), "duplicate key 'a'"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_safetensors_header_is_refused(tmp_path, case):
    header, match = BAD_HEADERS[case]
    f = write_safetensors(tmp_path / "x.safetensors", header, bytes(16))
    with pytest.raises(ModelFormatError, match=match) as e:
        _read_header(f)
    assert str(f) in one_line(e.value)


def test_good_headers_are_read(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "a": F32x1,
              "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}}          # a gap: allowed
    f = write_safetensors(tmp_path / "x.safetensors", header, bytes(8))
    assert {n: e.shape for n, e in _read_header(f).items()} == {"a": (1,), "empty": (0, 3), "b": (2,)}
    assert len(_read_header(STORIES / "model.safetensors")) == 47


def test_header_length_over_the_bound_is_refused_unread(tmp_path):
    f = tmp_path / "x.safetensors"
    n = 100_000_001
    with open(f, "wb") as out:                     # sparse: a header length the file can hold
        out.write(n.to_bytes(8, "little"))
        out.truncate(8 + n + 16)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match="bad header length"):
            _read_header(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("value", [5, None, ["model.safetensors"], {"f": "model.safetensors"}])
def test_index_with_a_non_string_file_name_is_refused(tmp_path, value):
    m = checkpoint(tmp_path)
    names = list(load_file(m / "model.safetensors").keys())
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = value
    (m / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFormatError, match=f"{INDEX_FILE}: weight_map\\['{names[0]}'\\] is .*not a file name"):
        WeightStore.open(m)


# ------------------------------------------------------------------------------ 4. quantized tensors

def edit_tensors(ckpt: Path, fn) -> None:
    """fn(tensors) edits, in place, the shard holding model.layers.0's tensors."""
    shard = json.loads((ckpt / INDEX_FILE).read_text())["weight_map"]["model.layers.0.mlp.down_proj.weight.qdata"]
    tensors = load_file(ckpt / shard)
    fn(tensors)
    save_file(tensors, str(ckpt / shard))
    weight_map = json.loads((ckpt / INDEX_FILE).read_text())["weight_map"]
    weight_map = {k: v for k, v in weight_map.items() if v != shard or k in tensors}
    weight_map.update({k: shard for k in tensors})
    edit_json(ckpt / INDEX_FILE, lambda idx: {**idx, "weight_map": weight_map})


DOWN = "model.layers.0.mlp.down_proj.weight"         # [N, K] = [64, 172], group 32: G = 6, packed K 86


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])
    return edit


def _drop(name):
    return lambda t: t.pop(name)


def _add(name, value):
    return lambda t: t.__setitem__(name, value)


BAD_QUANTIZED = {
    "qdata one row short": (_set(f"{DOWN}.qdata", lambda q: q[:-1].clone()), "qdata is U8 \\[63, 86\\]"),
    "qdata half the columns": (_set(f"{DOWN}.qdata", lambda q: q[:, :43].clone()), "qdata is U8 \\[64, 43\\]"),
    "qdata as int8": (_set(f"{DOWN}.qdata", lambda q: q.view(torch.int8)), "qdata is I8 \\[64, 86\\]"),
    "scale in float32": (_set(f"{DOWN}.scale", lambda s: s.float()), "scale is F32 \\[64, 6\\]"),
    "scale per channel": (_set(f"{DOWN}.scale", lambda s: s[:, :1].clone()), "scale is F16 \\[64, 1\\]"),
    "zero missing": (_drop(f"{DOWN}.zero"), f"lacks its tensor {DOWN}.zero"),
    "zero one group short": (_set(f"{DOWN}.zero", lambda z: z[:, :2].clone()), "zero is U8 \\[64, 2\\]"),
    "act_scale on weight-only": (_add(f"{DOWN}.act_scale", torch.ones(1)), "does not have"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUANTIZED))
def test_quantized_tensor_not_matching_its_format_is_refused(w4a16, tmp_path, case):
    edit, match = BAD_QUANTIZED[case]
    q = Path(shutil.copytree(w4a16, tmp_path / "q"))
    edit_tensors(q, edit)
    with pytest.raises(ModelFormatError, match=match) as e:
        load_model(q)
    assert DOWN in one_line(e.value) and ".safetensors: " in str(e.value)


@pytest.mark.parametrize("shape", [[0, 172], ["64", 172], [64.0, 172], [True, 172], [64], [64, 172, 1], "64x172",
                                   [64, 1 << 41]])
def test_quantized_weight_with_a_bad_logical_shape_is_refused(w4a16, tmp_path, shape):
    q = Path(shutil.copytree(w4a16, tmp_path / "q"))

    def edit(cfg):
        cfg["quantization_config"]["weights"][DOWN]["shape"] = shape
        return cfg
    edit_json(q / "config.json", edit)
    with pytest.raises(ModelFormatError, match=f"config.json: weights\\['{DOWN}'\\].shape is"):
        load_model(q)


def test_float_weight_stored_as_int64_is_refused(tmp_path):
    m = checkpoint(tmp_path)
    t = load_file(m / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.int64)
    save_file(t, str(m / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="model.safetensors: weight 'model.norm.weight' is stored as I64"):
        load_model(m)


def test_engine_float_weight_stored_as_int32_is_refused(engine, tmp_path):
    e = copy_engine(engine, tmp_path)
    t = load_file(e / WEIGHTS_FILE)
    t["model.layers.0.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"].to(torch.int32)
    save_file(t, str(e / WEIGHTS_FILE))
    relist(e, WEIGHTS_FILE)
    with pytest.raises(EngineError, match="weight 'model.layers.0.input_layernorm.weight' is stored as I32"):
        load_model(e)


def test_fused_weights_quantized_differently_are_refused(w4a16, tmp_path):
    """Found by fuzzing: gate and up stacked by gate_up_silu in two group sizes passed every per-weight
    check and crashed building the executor (an internal error)."""
    q = Path(shutil.copytree(w4a16, tmp_path / "q"))
    gate = "model.layers.0.mlp.gate_proj.weight"

    def edit(cfg):
        cfg["quantization_config"]["weights"][gate]["format"]["group_size"] = 33   # still 2 groups of 64
        return cfg
    edit_json(q / "config.json", edit)
    with pytest.raises(ModelFormatError, match="gate_up_silu stacks weights that must be quantized alike.*group 33"):
        load_model(q)


# ---------------------------------------------------------------------------- 5-7. engine and config

@pytest.mark.parametrize("edit,match", [
    (lambda m: m["graph"]["nodes"][0].update(op=""), "unknown op ''"),                 # was a KeyError
    (lambda m: m["graph"].update(outputs=[]), "outputs \\[\\] are not one logits value"),   # IndexError at run
    (lambda m: m["architecture"].update(vocab_size=511), "vocabulary .* is not vocab_size 511"),
    (lambda m: m["architecture"].update(num_layers=4, sliding_windows=[None] * 4), "attention layers are not 0..3"),
    (lambda m: m["graph"]["nodes"][0].update(inputs=[["tokens"]]), "graph.nodes\\[0\\] is malformed"),
    (lambda m: m.update(files=None), "files is None, not a JSON object"),
    (lambda m: next(n for n in m["graph"]["nodes"] if n["op"] == "rope")["attrs"].update(head_dim=0),
     "impossible attribute"),                                                           # ZeroDivisionError
])
def test_engine_graph_must_fit_its_architecture(engine, tmp_path, edit, match):
    """Found by fuzzing engine.json (which no checksum covers): each of these loaded, or failed with
    an internal error, and then crashed or misbehaved at run time."""
    e = copy_engine(engine, tmp_path)

    def change(m):
        edit(m)
        return m
    edit_json(e / ENGINE_FILE, change)
    with pytest.raises(EngineError, match=match):
        load_model(e)


@pytest.mark.parametrize("target", ["tpu", "metal"])
def test_engine_for_a_target_llmc_cannot_run_is_refused(engine, tmp_path, target):
    e = copy_engine(engine, tmp_path)
    edit_json(e / ENGINE_FILE, lambda m: {**m, "target": target})
    with pytest.raises(EngineError, match=f"target '{target}' cannot run here"):
        load_model(e)


@pytest.mark.parametrize("value", [["llmc"], "gptq", 4])
def test_quantization_config_of_the_wrong_type_is_refused(tmp_path, value):
    m = checkpoint(tmp_path)
    edit_json(m / "config.json", lambda c: {**c, "quantization_config": value})
    with pytest.raises(ModelFormatError, match="config.json: quantization_config is .*not an object"):
        load_model(m)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_engine_file_gets_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        compile(STORIES, tmp_path / "out.engine")
    finally:
        os.umask(old)
    out = tmp_path / "out.engine"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert WEIGHTS_FILE in modes and "tokenizer.model" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused(tmp_path, value):
    """A NaN or infinite float weight is refused when read, naming the tensor, not run."""
    m = tmp_path / "m"
    shutil.copytree(STORIES, m)
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(t, str(m / "model.safetensors"))
    r = subprocess.run([sys.executable, "-m", "llmc", "generate", str(m), "-p", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "model.layers.1.mlp.up_proj.weight" in r.stderr and "NaN or infinite" in r.stderr
