"""The triton target: compiling for it needs neither triton nor a GPU; running it on the CPU is refused
in one line unless TRITON_INTERPRET=1; under the interpreter the golden model's greedy tokens equal
the reference kernels', with prefill chunks and decodes mixed in the same steps."""
from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"        # before triton compiles any of our kernels

import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton target's tests need the triton package: "
                                               "pip install 'llmc[gpu]'")

from triton.backends import backends as TRITON_BACKENDS  # noqa: E402

import llmc.backends.triton  # noqa: E402,F401  (registers the target until llmc.targets lists it)
from llmc.compiler import compile  # noqa: E402
from llmc.engine import ENGINE_FILE  # noqa: E402
from llmc.errors import ConfigError  # noqa: E402
from llmc.generation import generate  # noqa: E402
from llmc.loader import load_model  # noqa: E402
from llmc.runtime.runner import RuntimeConfig  # noqa: E402
from llmc.runtime.sampler import SamplingParams  # noqa: E402
from llmc.targets import open_backend  # noqa: E402
from tests.helpers import STORIES  # noqa: E402

PROMPTS = ["Once upon a time", "Tom and his dog"]
# 6 tokens a step: the second prompt's prefill (7 tokens) runs in chunks beside the first prompt's
# prefill and decodes (GEMMs over 6 rows), then both decode (GEMVs over 2)
RUNTIME = dict(block_size=4, num_blocks=32, max_batched_tokens=6)
CPU_REFUSAL = "the triton target runs on an NVIDIA GPU; on CPU only under TRITON_INTERPRET=1, for verification"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-engine") / "stories.engine"
    compile(STORIES, out, target="triton")
    return out


def test_the_manifest_says_what_running_needs(engine):
    backend = json.loads((engine / ENGINE_FILE).read_text())["backend"]
    assert backend["device"] == "cuda" and backend["kernels"] == "triton"
    assert set(backend["ops"].values()) == {"triton"}
    assert backend["requires"] == ("an NVIDIA GPU (CUDA) and triton>=3.2 (pip install 'llmc[gpu]'); on CPU only "
                                   "under TRITON_INTERPRET=1, for verification")
    assert backend["triton"] == triton.__version__ and backend["artifact"] == "weights.safetensors"


def greedy(source, kernels: str):
    return generate(source, PROMPTS, SamplingParams(max_tokens=6), RuntimeConfig(kernels=kernels, **RUNTIME))


def test_golden_greedy_tokens_equal_the_reference(engine):
    ref, got = greedy(STORIES, "reference"), greedy(engine, "triton")
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in ref.completions]
    assert ref.completions[0].token_ids[:4] == [432, 383, 286, 261]          # ", there was a" (tests/test_golden.py)
    report = got.backend
    assert (report["target"], report["kernels"], report["device"]) == ("triton", "triton", "cpu")
    assert {"triton GEMV (float)", "triton GEMM (float)"} <= set(report["ops"]["linear"]["variants"])


def test_quantized_golden_greedy_tokens_equal_the_reference(stories_w4a16, tmp_path):
    """The golden model in w4a16 (int4 groups of 32, RTN): the int4 GEMV and GEMM in a whole model."""
    compile(stories_w4a16, tmp_path / "w4a16.engine", target="triton")
    ref, got = greedy(stories_w4a16, "reference"), greedy(tmp_path / "w4a16.engine", "triton")
    assert [c.token_ids for c in got.completions] == [c.token_ids for c in ref.completions]
    assert {"triton GEMV (int4)", "triton GEMM (int4)"} <= set(got.backend["ops"]["linear"]["variants"])


def test_cpu_is_refused_without_the_interpreter(engine, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError) as e:
        open_backend(load_model(engine), RuntimeConfig())
    assert e.value.message == CPU_REFUSAL and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error(engine):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        open_backend(load_model(engine), RuntimeConfig(device="cuda"))


def test_compiling_and_importing_need_no_triton(tmp_path):
    """In a fresh interpreter where triton cannot be imported: llmc, the kernel set and the target
    import, an engine compiles (its manifest saying no triton was there), and the first triton
    kernel call is a ConfigError naming the package and the extra."""
    code = f"""if True:
        import sys
        sys.modules["triton"] = None                     # import triton now raises ImportError
        import torch, llmc, llmc.kernels.triton, llmc.backends.triton
        from llmc.compiler import compile
        from llmc.errors import ConfigError
        from llmc.kernels import kernel_for
        print(compile({str(STORIES)!r}, {str(tmp_path / "e")!r}, target="triton").backend["triton"])
        try:
            kernel_for("rms_norm", "triton").fn(None, torch.ones(1, 4), torch.ones(4), eps=1e-5, group=4)
        except ConfigError as e:
            print(e)
    """
    run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "None", "the triton kernel set needs the triton package (triton>=3.2) (hint: pip install 'llmc[gpu]')"]


AOT = """if True:
    import warnings
    warnings.filterwarnings("ignore")
    from triton import compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from llmc.kernels.triton import lazy

    def build(module, kernel, pointers, constexprs):
        fn = getattr(lazy.module(module), kernel)
        signature = {a: "constexpr" if a in constexprs else pointers.get(a, "i32") for a in fn.arg_names}
        signature.update({a: "fp32" for a in ("eps", "scale") if a in signature})
        compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 80, 32))
        print(kernel)

    half = "*fp16"
    build("norm", "_rms_norm_kernel", dict(x_ptr=half, r_ptr=half, w_ptr=half, y_ptr=half, h_ptr=half),
          dict(ADD=True, BLOCK=4096))
    build("rope", "_rope_kernel", dict(x_ptr=half, cos_ptr="*fp32", sin_ptr="*fp32", y_ptr=half),
          dict(BLOCK_H=32, BLOCK_HALF=64))
    build("activation", "_silu_mul_kernel", dict(g_ptr=half, u_ptr=half, y_ptr=half), dict(BLOCK=1024))
    linear = lazy.module("linear")
    pointers = dict(x_ptr=half, w_ptr="*u8", s_ptr="*fp32", z_ptr="*u8", b_ptr=half, y_ptr=half)
    build("linear", "_gemv_kernel", pointers, dict(FMT="int4", GROUP=128, HAS_BIAS=True,
                                                   BLOCK_N=linear.GEMV_BLOCK_N, BLOCK_K=linear.GEMV_BLOCK_K))
    build("linear", "_gemm_kernel", pointers, dict(FMT="fp8", GROUP=1, HAS_BIAS=True, PRECISION="tf32", BLOCK_M=64,
                                                   BLOCK_N=linear.GEMM_BLOCK_N, BLOCK_K=linear.GEMM_BLOCK_K))
    build("kv_write", "_write_kv_kernel", dict(k_ptr=half, v_ptr=half, kc_ptr="*u8", vc_ptr="*u8", ks_ptr="*fp32",
                                               vs_ptr="*fp32", slot_ptr="*i64"), dict(CODE="fp8", BLOCK=1024))
    attention = lazy.module("attention")
    pointers = dict(q_ptr=half, o_ptr=half, kc_ptr="*i8", vc_ptr="*i8", ks_ptr="*fp32", vs_ptr="*fp32",
                    tables_ptr="*i32", seqs_ptr="*i32", tiles_ptr="*i32", q_start_ptr="*i32", q_len_ptr="*i32",
                    ctx_len_ptr="*i32")
    common = dict(CODE="int8", HAS_WINDOW=True, PRECISION="tf32", BLOCK_D=128)
    build("attention", "_decode_kernel", pointers, dict(common, BLOCK_G=16, BLOCK_N=attention.DECODE_BLOCK_N))
    build("attention", "_prefill_kernel", pointers,
          dict(common, BLOCK_M=attention.PREFILL_BLOCK_M, BLOCK_N=attention.PREFILL_BLOCK_N))
"""


@pytest.mark.skipif("nvidia" not in TRITON_BACKENDS, reason="this triton has no NVIDIA backend")
def test_every_kernel_compiles_for_an_nvidia_gpu():
    """Triton's real compiler (not the interpreter, which accepts shapes a GPU does not, such as a
    tl.dot over fewer than 16 features) builds each kernel for sm_80, down to the cubin, without a GPU:
    fp16 inputs and the richest decoder of each (int4 GEMV, fp8 GEMM, fp8 KV write, int8 KV attention)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-P", "-c", AOT], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["_rms_norm_kernel", "_rope_kernel", "_silu_mul_kernel", "_gemv_kernel",
                                  "_gemm_kernel", "_write_kv_kernel", "_decode_kernel", "_prefill_kernel"]
