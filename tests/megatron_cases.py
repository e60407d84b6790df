"""Tiny HF models of the architectures the Megatron backend supports, with random weights.

Qwen3 (qk-norm, head_dim != hidden / heads, tied), Qwen2 (q/k/v bias, untied) and Llama
(tied, Llama 3 RoPE scaling, a vocabulary of 251 that TP2 must pad). Weights are drawn
so that every part matters (norms away from 1, biases nonzero): a mapping that swapped
two of them would show.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def qwen3_config() -> Qwen3Config:
    return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True)


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


def llama_config(kv_heads: int = 2) -> LlamaConfig:
    """One kv head tests fewer kv groups than TP ranks (the model handles it; LoRA refuses it)."""
    return LlamaConfig(vocab_size=251, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=24, max_position_embeddings=16384,
                       rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=True)


def save_randomized(config, directory: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif param.dim() == 1:  # the q/k/v biases
                param.copy_(0.3 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
    model.save_pretrained(str(directory))
    return directory
