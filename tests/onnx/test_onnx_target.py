"""`compile --target onnx` and running the engine with ONNX Runtime through the runtime (paged KV
cache gathered into past_key_values, present written back): greedy tokens equal the cpu target's."""
from __future__ import annotations

from llmc.compiler import compile
from llmc.generation import generate
from llmc.loader import load_model
from llmc.quantized.scheme import recipe_from_options
from llmc.quantizer import quantize_checkpoint
from llmc.runtime.runner import RuntimeConfig
from llmc.runtime.sampler import SamplingParams
from tests.helpers import STORIES, make_checkpoint

PROMPTS = ["Once upon a time", "Tom and his dog", "The little girl saw a big red ball and"]


def test_the_golden_model_as_an_onnx_engine_generates_the_cpu_target_s_tokens(tmp_path):
    onnx_engine = tmp_path / "stories.onnx.engine"
    r = compile(STORIES, onnx_engine, target="onnx")
    assert (onnx_engine / "model.onnx").is_file() and (onnx_engine / "model.onnx.data").is_file()
    assert r.target == "onnx"
    params = SamplingParams(max_tokens=30)
    want = generate(STORIES, PROMPTS, params).completions
    got = generate(onnx_engine, PROMPTS, params, RuntimeConfig(max_batched_tokens=16))   # chunked prefills
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in want]
    assert got.backend["kernels"] == "onnxruntime" and got.backend["session_calls"] > 0


def test_a_quantized_model_with_an_int8_kv_cache_as_an_onnx_engine(tmp_path):
    path, _ = make_checkpoint(tmp_path / "hf", "llama", seed=11, num_attention_heads=8, num_key_value_heads=2)
    q = tmp_path / "q"
    quantize_checkpoint(path, q, recipe_from_options("w4a16", group_size=32, kv_cache="int8", calib_samples=8,
                                                     calib_seqlen=64))
    engine = tmp_path / "q.onnx.engine"
    compile(q, engine, target="onnx")
    prompts = [[1, 5, 9, 200, 31, 7], [1, 44, 45, 46]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = generate(q, prompts, params, RuntimeConfig(kernels="reference")).completions
    got = generate(engine, prompts, params).completions
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert load_model(engine).manifest["target"] == "onnx"


def test_inspect_shows_the_target_its_artifact_and_what_it_needs(tmp_path):
    from llmc.inspection import inspect
    engine = tmp_path / "stories.onnx.engine"
    compile(STORIES, engine, target="onnx")
    r = inspect(engine)
    assert (r.target, r.kernels, r.artifact) == ("onnx", "onnxruntime", "model.onnx")
    assert "onnxruntime" in r.requires and "CPU provider" in r.requires
    assert (engine / "genai_config.json").is_file()
    cpu = inspect(compile(STORIES, tmp_path / "cpu.engine").engine)
    assert (cpu.target, cpu.artifact) == ("cpu", "weights.safetensors") and "CPU" in cpu.requires
    assert inspect(STORIES).artifact is None                     # a checkpoint: no target yet


def test_dump_ir_writes_the_onnx_graph_as_text(tmp_path):
    dump = tmp_path / "ir"
    compile(STORIES, tmp_path / "e", target="onnx", dump_ir=dump)
    text = (dump / "target-onnx.txt").read_text()
    assert "past_key_values.0.key" in text and "present.4.value" in text and "Softmax" in text
    assert (dump / "final.txt").is_file()
