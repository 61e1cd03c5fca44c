"""Ctrl-C gives one line (`interrupted`) and exit 130 on every verb, SIGTERM exit 143, during
start-up too; a partial output is removed."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import GOLDEN, write_word_tokenizer


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A random llama checkpoint of ~200 MB: compiling it (writing and hashing) and decoding from it
    take long enough to be interrupted in the middle."""
    d = tmp_path_factory.mktemp("big")
    h, i, layers, vocab = 512, 1408, 16, 1000
    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
    (d / "config.json").write_text(__import__("json").dumps(cfg))
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g), "lm_head.weight": torch.randn(vocab, h, generator=g),
         "model.norm.weight": torch.ones(h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            t[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    save_file(t, str(d / "model.safetensors"))
    write_word_tokenizer(d, vocab)
    return d


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmc", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(p: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        assert p.poll() is None, f"finished before it could be interrupted: {p.communicate()}"
        time.sleep(0.02)


def stop(p: subprocess.Popen, sig) -> tuple[int, str]:
    assert p.poll() is None, "finished before it could be interrupted"
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    return p.returncode, stderr


def interrupted(rc: int, stderr: str, code: int = 130, line: str = "interrupted") -> None:
    assert rc == code, (rc, stderr)
    assert stderr.strip().splitlines()[-1] == line and "Traceback" not in stderr, stderr


def test_sigint_during_compile_removes_the_partial_engine(big, tmp_path):
    out = tmp_path / "e"
    p = start("compile", big, "-o", out)
    wait_for(p, lambda: (tmp_path / f".e.llmc-tmp.{p.pid}").exists())
    interrupted(*stop(p, signal.SIGINT))
    assert list(tmp_path.iterdir()) == []


def test_sigint_during_quantize(tmp_path):
    out = tmp_path / "q"
    p = start("quantize", GOLDEN / "stdlib-llama", "-o", out, "--scheme", "w4a16", "--algo", "gptq")
    wait_for(p, lambda: (tmp_path / f".q.llmc-tmp.{p.pid}").exists())
    interrupted(*stop(p, signal.SIGINT))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_during_generate(big, sig, code, line):
    p = start("generate", big, *[a for k in range(8) for a in ("-p", f"w{k + 3} w5")], "--max-tokens", "900",
              "--kernels", "reference")
    time.sleep(4)                            # loaded and decoding: 8 x 900 tokens take far longer
    interrupted(*stop(p, sig), code=code, line=line)


def test_sigint_during_start_up_is_not_a_traceback():
    p = start("inspect", GOLDEN / "stories260K")
    time.sleep(0.15)                         # importing the CLI
    rc, stderr = stop(p, signal.SIGINT)
    interrupted(rc, stderr)
