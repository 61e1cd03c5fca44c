"""The onnx lowering against llmc's reference kernels: random configs of every loader family, a
prefill and decode steps with the KV cache as explicit state; onnx.checker with full checking."""
from __future__ import annotations

import numpy as np
import onnx                       # the `onnx` extra, which the README's commands install
import onnxruntime as ort
import pytest
import torch

from llmc.backends.onnx_graph import lower_to_onnx
from llmc.loader import load_model
from tests.helpers import forward_all, make_checkpoint

ATOL = 2e-4          # fp32 logits of |x| <~ 5: ORT and torch order their sums differently

CONFIGS = {
    "llama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama-rope-llama3": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})),
    "llama-tied-bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True)),
    "mistral-window": ("mistral", dict(sliding_window=6)),
    "qwen2": ("qwen2", dict()),
    "qwen3-qknorm": ("qwen3", dict(head_dim=32)),
}


def session_options(optimized_path=None) -> ort.SessionOptions:
    """ORT fuses DequantizeLinear + MatMul into MatMulNBits, which by default (accuracy level 4)
    quantizes the activations to int8 as well; level 1 keeps them fp32: the scheme's numerics."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def run_session(model_proto, model, ids: list[int], prefill: int):
    """Logits of every position: `prefill` tokens at once, then one token per step with the cache."""
    a = model.arch
    sess = ort.InferenceSession(model_proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    kv_dtype = np.int8 if model.kv_dtype == torch.int8 else np.float32
    past = {f"past_key_values.{i}.{p}": np.zeros((1, a.num_kv_heads, 0, a.head_dim), kv_dtype)
            for i in range(a.num_layers) for p in ("key", "value")}
    out, done = [], 0
    for n in [prefill] + [1] * (len(ids) - prefill):
        feed = {"input_ids": np.array([ids[done:done + n]], np.int64),
                "attention_mask": np.ones((1, done + n), np.int64),
                "position_ids": np.arange(done, done + n, dtype=np.int64)[None], **past}
        res = sess.run(None, feed)
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, res))
        out.append(got["logits"][0])
        past = {k.replace("present", "past_key_values"): v for k, v in got.items() if k.startswith("present")}
        done += n
    return torch.from_numpy(np.concatenate(out))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_onnx_logits_match_the_reference_over_a_prefill_and_decode_steps(tmp_path, name):
    family, extra = CONFIGS[name]
    path, _ = make_checkpoint(tmp_path / name, family, seed=5, **extra)
    model = load_model(path)
    proto = lower_to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    ids = [1] + [int(t) for t in torch.randint(3, model.arch.vocab_size, (23,), generator=torch.Generator().manual_seed(2))]
    got = run_session(proto, model, ids, prefill=8)
    want = forward_all(model, ids, kernels="reference")
    assert got.shape == want.shape
    assert (got - want).abs().max() <= ATOL, float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


QUANT = {  # name: (scheme, resolve_scheme overrides)
    "w8a16": ("w8a16", {}),
    "w4a16-sym": ("w4a16", dict(group_size=32)),
    "w4a16-asym-partial": ("w4a16", dict(group_size=64, symmetric=False)),   # hidden 96: a partial last group
    "w4a16-asym-two-level": ("w4a16", dict(group_size=16, symmetric=False, two_level=True)),   # fp32 scales in ONNX
    "w8a8": ("w8a8", {}),
    "w4a8": ("w4a8", dict(group_size=32)),
    "fp8": ("fp8", {}),
}


@pytest.mark.parametrize("name", sorted(QUANT))
def test_quantized_weights_stay_quantized_and_match_the_reference(tmp_path, name):
    from llmc.quantized.scheme import QuantRecipe, resolve_scheme
    from llmc.quantizer import quantize_checkpoint
    scheme, overrides = QUANT[name]
    path, _ = make_checkpoint(tmp_path / "hf", "llama", seed=7, num_attention_heads=8, num_key_value_heads=2)
    out = tmp_path / name
    # minmax weights: with inputs quantized at run time (w4a8, fp8) ORT's rounding and the reference's
    # agree within ATOL only away from ties, which the mse default's weights meet on this model
    quantize_checkpoint(path, out, QuantRecipe(scheme=resolve_scheme(scheme, **overrides), calib_samples=8,
                                               calib_seqlen=64, weight_observer="minmax"))   # fp8: static inputs
    model = load_model(out)
    proto = lower_to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0].endswith(".weight.T")]
    assert len(dq) == 7 * model.arch.num_layers               # q, k, v, o, gate, up, down of every layer
    ids = [1] + [int(t) for t in torch.randint(3, model.arch.vocab_size, (20,), generator=torch.Generator().manual_seed(3))]
    got = run_session(proto, model, ids, prefill=6)
    want = forward_all(model, ids, kernels="reference")
    dumped = tmp_path / "optimized.onnx"                     # what ORT runs: its quantized MatMul
    ort.InferenceSession(proto.SerializeToString(), session_options(dumped), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(dumped)).graph.node]
    if scheme == "fp8":                 # no fp8 MatMul in ORT's CPU provider: it dequantizes once at load
        assert ops.count("MatMulNBits") == 0
    else:
        assert ops.count("MatMulNBits") == 7 * model.arch.num_layers and "DequantizeLinear" not in ops, set(ops)
    assert (got - want).abs().max() <= ATOL, float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_quantized_kv_cache_head_and_embeddings(tmp_path):
    """w4a16 with an int8 KV cache (int8 state through Q/DQ), an int4 head and int8 embeddings."""
    from llmc.quantized.scheme import recipe_from_options
    from llmc.quantizer import quantize_checkpoint
    path, _ = make_checkpoint(tmp_path / "hf", "qwen3", seed=9, head_dim=32)
    out = tmp_path / "q"
    quantize_checkpoint(path, out, recipe_from_options("w4a16", group_size=32, kv_cache="int8", head="int4",
                                                       embeddings="int8", calib_samples=8, calib_seqlen=64))
    model = load_model(out)
    proto = lower_to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    state = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input if i.name.startswith("past")}
    assert set(state.values()) == {onnx.TensorProto.INT8} and len(state) == 2 * model.arch.num_layers
    ids = [1] + [int(t) for t in torch.randint(3, model.arch.vocab_size, (20,), generator=torch.Generator().manual_seed(4))]
    got = run_session(proto, model, ids, prefill=7)
    want = forward_all(model, ids, kernels="reference")
    assert (got - want).abs().max() <= ATOL, float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
