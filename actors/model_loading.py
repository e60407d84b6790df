"""Load a base causal LM and its tokenizer: a hub id or a local directory, same code."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.to(device)
    model.eval()  # no dropout: training and sampling see the same function
    return model


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)
