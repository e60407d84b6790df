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


def describe_model(name_or_path: str) -> dict:
    """What the launcher needs to know about a model, read from its config (no weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    return {
        "name": name_or_path,
        "path": name_or_path,
        "arch": config.model_type,
        "vocab_size": config.vocab_size,
        "max_context": getattr(config, "max_position_embeddings", 4096),
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(describe_model(sys.argv[1])))
