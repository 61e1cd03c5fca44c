"""`genai_config.json`: what ONNX Runtime GenAI reads to generate from an onnx engine unchanged.

The engine directory already holds `model.onnx` (llmc.backends.onnx_graph) and the checkpoint's
tokenizer files; this config names the model's inputs and outputs, its shape, and the special
tokens. The KV cache is passed past -> present as separate, growing tensors
(`past_present_share_buffer: false`): the graph concatenates the new keys and values itself, with
standard ops, rather than writing into a preallocated buffer as GenAI's fused attention op does.
"""
from __future__ import annotations

from typing import Any

GENAI_CONFIG = "genai_config.json"
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3")   # decoder model types GenAI names as llmc does


def genai_config(model) -> dict[str, Any]:
    """The config for `model` (its arch and tokenizer info) lowered by onnx_graph.lower_to_onnx."""
    a, tok = model.arch, model.tokenizer.info
    eos = list(tok.eos_token_ids)
    decoder = {
        "session_options": {"log_id": "llmc", "provider_options": []},
        "filename": "model.onnx",
        "head_size": a.head_dim, "hidden_size": a.hidden_size,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
        "num_hidden_layers": a.num_layers,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    return {
        "model": {
            "type": a.model_type if a.model_type in GENAI_TYPES else "llama",
            "vocab_size": a.vocab_size, "context_length": a.max_position_embeddings,
            "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else 0,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": eos[0] if eos else 0,
            "decoder": decoder,
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
                   "max_length": a.max_position_embeddings, "past_present_share_buffer": False,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0},
    }
