"""`compile --target tensorrt`: without TensorRT or an NVIDIA GPU it fails with one line naming what is
missing and writes nothing; the optimisation profile, the manifest record and the portability check
as pure functions; the network built from the golden model's ONNX where TensorRT and a GPU are there,
and the plan generating the cpu target's tokens on a GPU."""
from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmc.cli import main
from llmc.engine import ENGINE_FILE
from llmc.errors import ConfigError, EngineError
from llmc.targets import available_targets, unregister_target
from tests.helpers import STORIES

GOLDEN_ARCH = SimpleNamespace(max_position_embeddings=512, num_layers=5, num_kv_heads=4, head_dim=8)


@pytest.fixture
def trt_target():
    """llmc.backends.tensorrt, its target registered for one test (a fresh import registers it)."""
    available_targets()                                  # the built-in targets first, in their order
    sys.modules.pop("llmc.backends.tensorrt", None)
    unregister_target("tensorrt")
    module = importlib.import_module("llmc.backends.tensorrt")
    yield module
    unregister_target("tensorrt")
    sys.modules.pop("llmc.backends.tensorrt", None)     # the next lookup of the target imports it anew


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except (ImportError, OSError):
        return False
    return True


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lacking(module) -> list:
    missing = module.requirements()
    if not missing:
        pytest.skip("this machine has TensorRT, onnx and an NVIDIA GPU: compiling for tensorrt succeeds here")
    return missing


# ---------------------------------------------------------------------------------------------
# On a machine without TensorRT or a GPU


def test_requirements_name_what_this_machine_lacks(trt_target):
    whats = {m.what for m in trt_target.requirements()}
    assert ("TensorRT" in whats) == (not _imports("tensorrt"))
    assert ("an NVIDIA GPU" in whats) == (not torch.cuda.is_available())
    assert ("onnx" in whats) == (not _imports("onnx"))


def test_compile_without_tensorrt_or_a_gpu_exits_2_with_one_line_and_writes_nothing(trt_target, tmp_path, capsys):
    missing = lacking(trt_target)
    out = tmp_path / "stories.trt.engine"
    with pytest.raises(SystemExit) as e:
        main(["compile", str(STORIES), "-o", str(out), "--target", "tensorrt"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0] == f"error: {trt_target.requirement_error(missing).one_line()}"
    assert lines[0].startswith("error: target tensorrt needs ")
    assert ("TensorRT" in lines[0]) == (not _imports("tensorrt"))
    assert ("NVIDIA GPU" in lines[0]) == (not torch.cuda.is_available())
    assert list(tmp_path.iterdir()) == []                      # no engine, no temporary directory


def test_a_failed_tensorrt_compile_with_force_leaves_the_existing_engine_as_it_was(trt_target, tmp_path,
                                                                                    stories_engine, capsys):
    lacking(trt_target)
    out = tmp_path / "e"
    shutil.copytree(stories_engine, out)
    before = digest(out)
    with pytest.raises(SystemExit) as e:
        main(["compile", str(STORIES), "-o", str(out), "--target", "tensorrt", "--force"])
    assert e.value.code == 2 and "target tensorrt needs" in capsys.readouterr().err
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_lower_checks_its_requirements_before_any_work(trt_target, tmp_path):
    lacking(trt_target)
    from llmc.model import load_checkpoint
    model = load_checkpoint(STORIES)
    with pytest.raises(ConfigError, match="target tensorrt needs"):
        trt_target.lower(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tensorrt_engine_is_refused_at_load_naming_what_is_missing(trt_target, tmp_path, stories_engine):
    lacking(trt_target)
    from llmc.generation import generate
    from llmc.runtime.runner import RuntimeConfig
    engine = tmp_path / "fake.trt.engine"                     # a tensorrt manifest over the cpu engine's files
    shutil.copytree(stories_engine, engine)
    manifest = json.loads((engine / ENGINE_FILE).read_text())
    built = trt_target.Platform("10.3.0", "8.9", "NVIDIA L4")
    manifest.update(target="tensorrt", backend=trt_target.backend_section(
        built, trt_target.profile_for(GOLDEN_ARCH), ["embed"], 21))
    (engine / ENGINE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="target tensorrt needs"):
        generate(engine, ["Once upon a time"], runtime=RuntimeConfig(device="cuda"))


def test_requirement_error_names_everything_missing_in_one_line(trt_target):
    Missing = trt_target.Missing
    gpu = Missing("an NVIDIA GPU", "no NVIDIA GPU is visible (torch.cuda.is_available() is False)", "use a GPU machine")
    trt = Missing("TensorRT", "the tensorrt package is not installed", "pip install 'llmc[gpu]'")
    onnx = Missing("onnx", "the onnx package is not installed", "pip install 'llmc[gpu]'")
    assert trt_target.requirement_error([gpu]).one_line() == (
        "target tensorrt needs an NVIDIA GPU: no NVIDIA GPU is visible (torch.cuda.is_available() is False) "
        "(hint: use a GPU machine)")
    assert trt_target.requirement_error([trt, onnx, gpu]).one_line() == (
        "target tensorrt needs TensorRT, onnx and an NVIDIA GPU: the tensorrt package is not installed; the onnx "
        "package is not installed; no NVIDIA GPU is visible (torch.cuda.is_available() is False) "
        "(hint: pip install 'llmc[gpu]'; use a GPU machine)")
    assert trt_target.requirements((lambda: None, lambda: gpu)) == [gpu]


# ---------------------------------------------------------------------------------------------
# The optimisation profile, the manifest record and the portability check


def test_the_profile_covers_the_model_s_context_capped(trt_target):
    p = trt_target.profile_for(GOLDEN_ARCH)
    assert (p.batch, p.seq, p.past, p.total, p.context) == ((1, 1, 8), (1, 1, 256), (0, 255, 511), (1, 256, 767), 512)
    long = trt_target.profile_for(SimpleNamespace(max_position_embeddings=131072))
    assert long.context == 4096 and long.past == (0, 2047, 4095) and long.seq == (1, 1, 256)
    short = trt_target.profile_for(SimpleNamespace(max_position_embeddings=100),
                                   trt_target.ProfileLimits(max_batch=2, max_seq=512, max_context=4096))
    assert (short.batch, short.seq, short.past) == ((1, 1, 2), (1, 1, 100), (0, 49, 99))
    tiny = trt_target.profile_for(SimpleNamespace(max_position_embeddings=1))
    assert (tiny.seq, tiny.past, tiny.total) == ((1, 1, 1), (0, 0, 0), (1, 1, 1))


def test_the_profile_shapes_are_every_dynamic_input_of_the_onnx_graph_and_consistent(trt_target):
    pytest.importorskip("onnx", reason="the onnx package (the onnx extra) is not installed")
    from llmc.backends.onnx_graph import lower_to_onnx
    from llmc.model import load_checkpoint
    model = load_checkpoint(STORIES)
    shapes = trt_target.profile_for(model.arch).shapes(model.arch)
    graph = lower_to_onnx(model).graph
    declared = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                for i in graph.input if i.name not in {t.name for t in graph.initializer}}
    assert set(shapes) == set(declared)
    for name, dims in declared.items():
        for shape in shapes[name]:                             # min, opt, max: static dims as the graph has them
            assert len(shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, shape)), name
        assert all(lo <= opt <= hi for lo, opt, hi in zip(*shapes[name])), name
    for k in range(3):                                         # attention_mask covers past + new tokens
        assert shapes["attention_mask"][k][1] == shapes["past_key_values.0.key"][k][2] + shapes["input_ids"][k][1]


def test_the_profile_round_trips_through_the_manifest_and_a_malformed_one_is_refused(trt_target):
    p = trt_target.profile_for(GOLDEN_ARCH)
    assert trt_target.Profile.from_dict(json.loads(json.dumps(p.to_dict())), "e/engine.json") == p
    for bad in (None, {"batch": [1, 1, 8], "seq": [1, 1, 256]}, {**p.to_dict(), "seq": [0, 1, 256]},
                {**p.to_dict(), "past": [0, 600, 511]}, {**p.to_dict(), "batch": [1, 1, "8"]}):
        with pytest.raises(EngineError, match="e/engine.json: backend.profile is malformed"):
            trt_target.Profile.from_dict(bad, "e/engine.json")


def test_the_backend_section_records_the_plan_version_gpu_and_profile(trt_target):
    built = trt_target.Platform("10.3.0", "8.9", "NVIDIA L4")
    p = trt_target.profile_for(GOLDEN_ARCH)
    s = json.loads(json.dumps(trt_target.backend_section(built, p, ["embed", "linear", "linear"], 21)))
    assert (s["device"], s["kernels"], s["artifact"], s["opset"]) == ("cuda", "tensorrt", "model.plan", 21)
    assert (s["tensorrt"], s["compute_capability"], s["gpu"]) == ("10.3.0", "8.9", "NVIDIA L4")
    assert s["ops"] == {"embed": "tensorrt", "linear": "tensorrt"} and s["profile"] == p.to_dict()
    assert "TensorRT 10.3.0" in s["requires"] and "compute capability 8.9" in s["requires"]
    assert trt_target.platform_of(s, "e/engine.json") == built
    with pytest.raises(EngineError, match="e/engine.json: backend lacks the TensorRT version"):
        trt_target.platform_of({**s, "compute_capability": 8.9}, "e/engine.json")


def test_a_plan_runs_only_on_its_tensorrt_version_and_compute_capability(trt_target):
    Platform, check = trt_target.Platform, trt_target.check_portable
    built = Platform("10.3.0", "8.9", "NVIDIA L4")
    check(built, Platform("10.3.0", "8.9", "NVIDIA GeForce RTX 4090"))     # same capability, another card
    with pytest.raises(EngineError) as e:
        check(built, Platform("10.5.0", "8.0", "NVIDIA A100"))
    assert e.value.message == ("engine was built for TensorRT 10.3.0 on compute capability 8.9 (NVIDIA L4); this "
                               "machine has TensorRT 10.5.0 and compute capability 8.0 (NVIDIA A100)")
    with pytest.raises(EngineError, match=r"TensorRT 10\.3\.0 .*TensorRT 10\.5\.0"):
        check(built, Platform("10.5.0", "8.9", "NVIDIA L4"))
    with pytest.raises(EngineError, match=r"compute capability 8\.9 .*compute capability 9\.0"):
        check(built, Platform("10.3.0", "9.0", "NVIDIA H100"))


# ---------------------------------------------------------------------------------------------
# With TensorRT (and, for the builder, a GPU)


def tensorrt_builder(module):
    """(tensorrt, logger, builder), or a skip naming what this machine lacks."""
    missing = module.requirements()
    if missing:
        pytest.skip(module.requirement_error(missing).one_line())
    trt = module.require()
    log = module._logger(trt)
    try:
        return trt, log, module.make_builder(trt, log)
    except ConfigError as e:
        pytest.skip(e.one_line())


def test_the_network_is_built_from_the_golden_model_s_onnx(trt_target, tmp_path):
    trt, log, builder = tensorrt_builder(trt_target)
    from llmc.model import load_checkpoint
    model = load_checkpoint(STORIES)
    network, _parser = trt_target.parse_network(trt, builder, trt_target.write_onnx(model, tmp_path), log)
    shapes = trt_target.profile_for(model.arch).shapes(model.arch)
    assert {network.get_input(i).name for i in range(network.num_inputs)} == set(shapes)
    assert {network.get_output(i).name for i in range(network.num_outputs)} == {
        "logits", *(f"present.{i}.{part}" for i in range(model.arch.num_layers) for part in ("key", "value"))}
    config = trt_target.builder_config(trt, builder, shapes)
    assert config.num_optimization_profiles == 1


def test_the_golden_model_as_a_tensorrt_engine_generates_the_cpu_target_s_tokens(trt_target, tmp_path):
    tensorrt_builder(trt_target)
    from llmc.compiler import compile
    from llmc.generation import generate
    from llmc.runtime.runner import RuntimeConfig
    from llmc.runtime.sampler import SamplingParams
    engine = tmp_path / "stories.trt.engine"
    r = compile(STORIES, engine, target="tensorrt")
    assert (engine / "model.plan").is_file() and not (engine / "model.onnx").exists()
    major, minor = torch.cuda.get_device_capability()
    assert r.backend["compute_capability"] == f"{major}.{minor}"
    prompts, params = ["Once upon a time", "Tom and his dog"], SamplingParams(max_tokens=30)
    want = generate(STORIES, prompts, params).completions
    got = generate(engine, prompts, params, RuntimeConfig(device="cuda", max_batched_tokens=16))
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in want]
    assert got.backend["plan_calls"] > 0
