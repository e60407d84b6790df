"""What the launcher needs to know about a model: its architecture, vocabulary size and context length.

transformers imports torch, which nothing under launch/ may (and which costs ~3 s of a cold start before the
launcher can start anything), so a local model directory whose config.json states all three for an
architecture tinkerd serves is read here, torch-free, in the launcher's own process. Anything else (a hub id, a
config that leaves a value to its class's default, another architecture) is asked of transformers' AutoConfig
in a subprocess: `python -m actors.model_info NAME_OR_PATH` prints the same summary as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

READ_DIRECTLY = frozenset({"qwen3", "qwen2", "llama"})  # architectures whose config.json is read without AutoConfig


def local_summary(name_or_path: str) -> dict | None:
    """The summary of a local model directory from its config.json alone, or None when AutoConfig must answer."""
    config_file = Path(name_or_path).expanduser() / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # not a local model (a hub id), or a config AutoConfig will explain better
    if not isinstance(config, dict) or config.get("model_type") not in READ_DIRECTLY:
        return None
    vocab_size, max_context = config.get("vocab_size"), config.get("max_position_embeddings")
    if not isinstance(vocab_size, int) or not isinstance(max_context, int):
        return None  # left to the config class's default, which only transformers knows
    return {"name": name_or_path, "path": name_or_path, "arch": config["model_type"], "vocab_size": vocab_size,
            "max_context": max_context}


def describe_model(name_or_path: str) -> dict:
    """The summary as transformers reads the config (no weights); imports torch."""
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
    import sys

    print(json.dumps(describe_model(sys.argv[1])))
