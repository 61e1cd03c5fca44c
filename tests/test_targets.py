"""The backend seam: compile lowers through the target, loading dispatches on the manifest's target
and refuses one it cannot run, a toy target added in one module compiles, loads and generates, and
what ran (target, device, kernel set, kernel variants per op) reaches the manifest and results."""
from __future__ import annotations

import importlib
import json
import shutil
import sys

import pytest

from llmc.compiler import compile
from llmc.engine import ENGINE_FILE, SCHEMA_VERSION
from llmc.errors import ConfigError, EngineError
from llmc.generation import generate
from llmc.loader import load_model
from llmc.runtime.runner import RuntimeConfig
from llmc.runtime.sampler import SamplingParams
from llmc.targets import TARGETS, available_targets, unregister_target
from tests.helpers import STORIES

PROMPTS = ["Once upon a time", "Tom and his dog"]
GREEDY = SamplingParams(max_tokens=24)


@pytest.fixture
def toy_target():
    """The toy target registered for one test (a fresh import registers it), then unregistered."""
    sys.modules.pop("tests.toy_target", None)
    module = importlib.import_module("tests.toy_target")
    yield module
    unregister_target(module.NAME)
    sys.modules.pop("tests.toy_target", None)


def test_a_toy_target_compiles_loads_and_generates(toy_target, tmp_path, stories_engine):
    r = compile(STORIES, tmp_path / "toy.engine", target=toy_target.NAME)
    manifest = json.loads((tmp_path / "toy.engine" / ENGINE_FILE).read_text())
    assert r.target == manifest["target"] == toy_target.NAME
    assert manifest["backend"]["kernels"] == "reference" and manifest["backend"]["device"] == "cpu"
    model = load_model(tmp_path / "toy.engine")
    assert model.target == toy_target.NAME
    toy = generate(None, PROMPTS, GREEDY, model=model)
    assert toy.backend["target"] == toy_target.NAME and toy.backend["kernels"] == "reference"
    assert all(c.token_ids for c in toy.completions)
    # the same graph and weights with the same kernels through the cpu target give the same tokens
    ref = generate(stories_engine, PROMPTS, GREEDY, RuntimeConfig(kernels="reference"))
    assert [c.token_ids for c in toy.completions] == [c.token_ids for c in ref.completions]


def test_a_target_runs_only_its_kernel_sets_and_devices(toy_target, tmp_path):
    compile(STORIES, tmp_path / "toy.engine", target=toy_target.NAME)
    model = load_model(tmp_path / "toy.engine")
    with pytest.raises(ConfigError, match="runs the kernel sets reference, not 'cpu'"):
        generate(None, PROMPTS, GREEDY, RuntimeConfig(kernels="cpu"), model=model)
    with pytest.raises(ConfigError, match="runs on cpu, not 'cuda'"):
        generate(None, PROMPTS, GREEDY, RuntimeConfig(device="cuda"), model=model)


def test_an_engine_of_a_target_this_llmc_lacks_is_refused_by_name(toy_target, tmp_path):
    compile(STORIES, tmp_path / "toy.engine", target=toy_target.NAME)
    unregister_target(toy_target.NAME)
    with pytest.raises(EngineError, match=f"target '{toy_target.NAME}' cannot run here"):
        load_model(tmp_path / "toy.engine")


def test_the_builtin_targets():
    assert {"cpu", "onnx", "tensorrt", "triton"} <= set(available_targets())
    with pytest.raises(ConfigError, match="unknown target 'tpu'"):
        compile(STORIES, "/nonexistent/never-written", target="tpu")


def test_an_engine_of_the_previous_schema_is_refused_with_the_command_to_rebuild_it(stories_engine, tmp_path):
    old = tmp_path / "old.engine"
    shutil.copytree(stories_engine, old)
    manifest = json.loads((old / ENGINE_FILE).read_text())
    manifest["schema_version"] = SCHEMA_VERSION - 1
    del manifest["backend"]
    (old / ENGINE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="built by an older llmc.*rebuild it") as e:
        load_model(old)
    assert e.value.hint == f"llmc compile {STORIES} -o {old} --force"


def test_what_ran_is_recorded(stories_engine):
    manifest = json.loads((stories_engine / ENGINE_FILE).read_text())
    backend = manifest["backend"]
    assert backend["kernels"] == "native" and backend["device"] == "cpu" and "native_gemv" in backend
    assert set(backend["ops"]) == {n["op"] for n in manifest["graph"]["nodes"]}
    assert set(backend["ops"].values()) == {"native"}
    r = generate(stories_engine, PROMPTS, GREEDY)                  # the default: one native call per step
    assert r.backend["kernels"] == "native" and set(r.backend["ops"]) == set(backend["ops"])
    assert {o["kernels"] for o in r.backend["ops"].values()} == {"native"}
    r = generate(stories_engine, PROMPTS, GREEDY, RuntimeConfig(kernels="cpu"))
    ops = r.backend["ops"]
    assert set(ops) == set(backend["ops"]) and all(o["kernels"] == "cpu" for o in ops.values())
    linear_calls = sum(sum(ops[op]["variants"].values()) for op in ("qkv_linear", "gate_up_silu", "linear", "logits"))
    assert linear_calls > 0                           # every matmul says whether it ran native or fell back
    assert set().union(*(ops[op]["variants"] for op in ops)) <= {
        "native GEMV", "torch GEMM", "native int8 GEMV", "native int4 GEMV", "native dequantize + torch GEMM",
        "torch dequantize + GEMM"}
