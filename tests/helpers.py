"""Test helpers: random-initialised Hugging Face checkpoints (with a small word-level tokenizer)
and direct forwards through llmc's executor."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmc.runtime.batch import RaggedBatch

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
STORIES = GOLDEN / "stories260K"


def hf_classes(model_type: str):
    import transformers as tf
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[model_type]


BASE = dict(vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer: <unk> <s> </s> then w3 ... w{vocab-1}; BOS added per tokenizer_config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_checkpoint(directory: Path, model_type: str, seed: int = 0, tokenizer: bool = True, **overrides):
    """Save a random-init transformers model of `model_type`; returns (directory, hf_model)."""
    config_cls, model_cls = hf_classes(model_type)
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():                      # norms away from 1 so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer:
        write_word_tokenizer(directory, config.vocab_size)
    return directory, model


GPU_KERNEL_SETS = ("triton",)   # run on the CPU only under Triton's interpreter: tests/kernels/test_triton_*.py


def fast_kernel_sets() -> list[str]:
    """Every registered kernel set that runs on the CPU but the reference: what parity tests compare
    with the reference (whether or not a test module has imported the triton set before)."""
    from llmc.kernels import KERNEL_SETS
    return [name for name in KERNEL_SETS if name != "reference" and name not in GPU_KERNEL_SETS]


def backend(model, kernels: str = "cpu"):
    """The backend that runs `model` (its target's) with the kernel set `kernels`, on the CPU."""
    from llmc.runtime.runner import RuntimeConfig
    from llmc.targets import open_backend
    return open_backend(model, RuntimeConfig(kernels=kernels))


def forward_all(model, ids: list[int], kernels: str = "cpu", executor=None) -> torch.Tensor:
    """Logits for every position of one sequence run as a single prefill through llmc."""
    ex = executor or backend(model, kernels)
    kv = ex.allocate_kv(-(-len(ids) // 16), 16)            # the backend's cache format (a quantized KV cache)
    batch = RaggedBatch(token_ids=list(ids), query_lens=[len(ids)], context_lens=[len(ids)],
                        block_tables=[list(range(kv.num_blocks))], block_size=16, all_logits=True)
    return ex.forward(batch, kv)
