"""The onnx engine against the cpu target's engine, compiled from the same checkpoint: every loader
family x every weight scheme, two sequences in one ragged batch (block tables with holes), a prefill
and 16 decode steps in which ONNX Runtime runs both decodes in one call with a left-padded past.
Logits within ATOL at every step (schemes that quantize inputs or the KV cache at run time: within
the dynamic-inputs bounds, since one ulp upstream can move a value across a rounding boundary, and
the greedy token compared where the top-two margin is beyond twice the logits' difference) and the
same greedy token."""
from __future__ import annotations

import pytest
import torch

from llmc.compiler import compile
from llmc.loader import load_model
from llmc.quantized.scheme import QuantRecipe, recipe_from_options, resolve_scheme
from llmc.quantizer import quantize_checkpoint
from llmc.runtime.batch import RaggedBatch
from llmc.runtime.runner import RuntimeConfig
from llmc.targets import open_backend
from tests.helpers import make_checkpoint
from tests.tolerances import DYNAMIC_INPUTS_MAX, DYNAMIC_INPUTS_MEAN

# fp32 logits of |x| <~ 5 through 2 layers: ORT and llmc sum in different orders (MatMulNBits, SDPA)
ATOL = 3e-4
DECODE_STEPS = 16
BLOCK = 4
TABLES = ([9, 2, 7, 4, 11, 0, 13], [5, 1, 10, 3, 12, 8, 6])   # interleaved, never contiguous

FAMILIES = {  # name: (model_type, config overrides)
    "llama": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, attention_bias=True,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("mistral", dict(sliding_window=5, num_attention_heads=4, num_key_value_heads=1)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2)),
}
DYNAMIC = ("w8a8", "fp8")   # inputs quantized at run time (fp8: a static scale, still rounded per value)
SCHEMES = {  # name: the recipe (None: the float checkpoint)
    "fp32": None,
    "w8a16": dict(scheme="w8a16"),
    "w4a16-sym": dict(scheme="w4a16", group_size=32),
    "w4a16-asym-partial": dict(scheme="w4a16", group_size=64, symmetric=False),   # hidden 96: 64 + 32
    "w8a8": dict(scheme="w8a8"),
    "fp8": dict(scheme="fp8"),
}


def _checkpoint(tmp_path, family: str, recipe: dict | None, **recipe_options):
    model_type, extra = FAMILIES[family]
    path, _ = make_checkpoint(tmp_path / "hf", model_type, seed=13, **extra)
    if recipe is None and not recipe_options:
        return path
    out = tmp_path / "q"
    if recipe is None:
        r = recipe_from_options("w8a16", calib_samples=8, calib_seqlen=64, **recipe_options)
    else:
        scheme = resolve_scheme(recipe["scheme"], **{k: v for k, v in recipe.items() if k != "scheme"})
        r = QuantRecipe(scheme=scheme, calib_samples=8, calib_seqlen=64)
    quantize_checkpoint(path, out, r)
    return out


def run_both(tmp_path, checkpoint) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of the cpu and onnx engines, step by step, the cpu target's greedy tokens fed to both."""
    backends, caches = {}, {}
    for target in ("cpu", "onnx"):
        engine = tmp_path / f"{target}.engine"
        compile(checkpoint, engine, target=target)
        backends[target] = open_backend(load_model(engine), RuntimeConfig())
        caches[target] = backends[target].allocate_kv(14, BLOCK)
    vocab = load_model(checkpoint).arch.vocab_size
    g = torch.Generator().manual_seed(4)
    prompts = [[1] + torch.randint(3, vocab, (8,), generator=g).tolist(),
               [1] + torch.randint(3, vocab, (4,), generator=g).tolist()]
    steps = {"cpu": [], "onnx": []}
    new, lengths = prompts, [0, 0]
    for _ in range(DECODE_STEPS + 1):
        lengths = [n + len(t) for n, t in zip(lengths, new)]
        for target, b in backends.items():
            batch = RaggedBatch(token_ids=[t for ts in new for t in ts], query_lens=[len(t) for t in new],
                                context_lens=lengths, block_tables=[list(t) for t in TABLES], block_size=BLOCK)
            steps[target].append(b.forward(batch, caches[target]))
        new = [[int(t)] for t in steps["cpu"][-1].argmax(-1)]
    return steps["cpu"], steps["onnx"]


def assert_same(want: list[torch.Tensor], got: list[torch.Tensor], dynamic: bool = False) -> None:
    for step, (w, o) in enumerate(zip(want, got)):
        assert o.shape == w.shape
        diff = (o - w).abs()
        decided = torch.ones(w.shape[0], dtype=torch.bool)
        if dynamic:
            assert diff.max() <= DYNAMIC_INPUTS_MAX and diff.mean() <= DYNAMIC_INPUTS_MEAN, (step, diff.max())
            top = w.topk(2, dim=-1).values                # a near tie, within the rounding's reach, is not
            decided = top[:, 0] - top[:, 1] > 2 * diff.max(dim=-1).values    # decided by the model
        else:
            assert diff.max() <= ATOL, (step, float(diff.max()))
        assert torch.equal(o.argmax(-1)[decided], w.argmax(-1)[decided]), step


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_engine_matches_the_cpu_target(tmp_path, family, scheme):
    want, got = run_both(tmp_path, _checkpoint(tmp_path, family, SCHEMES[scheme]))
    assert len(want) == DECODE_STEPS + 1
    assert_same(want, got, dynamic=scheme in DYNAMIC)


@pytest.mark.parametrize("kv_cache", ["int8", "fp8"])
def test_a_quantized_kv_cache_runs_as_stored(tmp_path, kv_cache):
    """int8 and fp8 KV: the cache's own bytes are the graph's state (past in, present out)."""
    checkpoint = _checkpoint(tmp_path, "mistral", None, kv_cache=kv_cache)
    want, got = run_both(tmp_path, checkpoint)
    assert_same(want, got, dynamic=True)
