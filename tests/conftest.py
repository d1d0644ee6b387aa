"""Shared fixtures: tiny random models of every supported architecture, built from configs (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("GRUN_TOFU_DIR", REPO.parent / "shared" / "data" / "tofu"))

_COMMON = dict(vocab_size=97, num_hidden_layers=3, max_position_embeddings=128)
_LLAMA_LIKE = dict(_COMMON, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=None),
    "mixtral": lambda: transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=12),
    "gemma": lambda: transformers.GemmaConfig(**_LLAMA_LIKE, head_dim=12),
    "gemma2": lambda: transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=12),
    "phi3": lambda: transformers.Phi3Config(**_LLAMA_LIKE, pad_token_id=0),
    "olmo2": lambda: transformers.Olmo2Config(**_LLAMA_LIKE),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=3, n_head=4, n_positions=128),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128,
    ),
}


def tiny_model(model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `model_type`, fp32, eval mode, eager attention (deterministic)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def llama():
    return tiny_model("llama")
