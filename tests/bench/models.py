"""The model a benchmark runs on: the built-in one, a local directory, or a config built
with random weights at a given size.

    python -m tests.bench.models builtin DIR
    python -m tests.bench.models config (PRESET | CONFIG.json) DIR [--dtype bfloat16]

`config` writes a full model directory (config.json, random weights, and the built-in
byte-level BPE tokenizer, whose ids are all below the model's vocabulary): enough for
tinkerd's launcher (`--model DIR`) and for the raw baseline, without any hub. Random
weights cost exactly what trained ones cost. PRESETS holds the architectures of real
models by name, e.g. `qwen3-0.6b` (Qwen3-0.6B's shapes: 0.6B parameters, 0.44B without
the tied embedding) for a GPU box.

The benchmark process itself never imports torch: it runs this module as a subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Qwen3 shapes from the published config.json files of the Qwen3 family.
_QWEN3_COMMON = dict(model_type="qwen3", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=40960, attention_bias=False, vocab_size=151936)
PRESETS: dict[str, dict] = {
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # a small step up from the built-in model, for CPU runs that want more compute per token
    "qwen3-40m": dict(_QWEN3_COMMON, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                      vocab_size=32768),
}


def config_from_arg(value: str) -> dict:
    """A preset name or a config.json path -> the config dict."""
    if value in PRESETS:
        return dict(PRESETS[value])
    path = Path(value)
    if path.is_file():
        return json.loads(path.read_text())
    raise ValueError(f"--model-config {value!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")


def cached_dir(cache_dir: Path, kind: str, config: dict | None = None, dtype: str = "float32") -> Path:
    if kind == "builtin":
        return cache_dir / "models" / "tiny-qwen3"
    key = hashlib.sha256(json.dumps([config, dtype], sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / "models" / f"random-{config.get('model_type', 'model')}-{key}"


def prepare(cache_dir: Path, config_arg: str | None, dtype: str = "float32") -> dict:
    """Build (once, cached) the built-in model or a random-weights model; return its summary."""
    if config_arg is None:
        directory = cached_dir(cache_dir, "builtin")
        cmd = [sys.executable, "-m", "tests.bench.models", "builtin", str(directory)]
    else:
        config = config_from_arg(config_arg)
        directory = cached_dir(cache_dir, "config", config, dtype)
        cmd = [sys.executable, "-m", "tests.bench.models", "config", config_arg, str(directory), "--dtype", dtype]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_random(config_dict: dict, directory: Path, dtype: str) -> dict:
    marker = directory / "tinkerd_bench_model.json"
    if marker.exists():
        return json.loads(marker.read_text())
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from actors.builtin_model import build_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    fields = dict(config_dict)
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        fields.pop(key, None)
    fields.update(bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                  pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    if fields.get("vocab_size", 0) < len(tokenizer):
        raise ValueError(f"vocab_size {fields.get('vocab_size')} is smaller than the tokenizer's {len(tokenizer)}")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model = AutoModelForCausalLM.from_config(config, dtype=dtypes[dtype])
    model.save_pretrained(str(directory), safe_serialization=True)
    summary = {"name": str(directory), "path": str(directory), "arch": model_type, "vocab_size": config.vocab_size,
               "parameters": sum(p.numel() for p in model.parameters()), "random_weights": True}
    marker.write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    builtin = sub.add_parser("builtin", help="the built-in tiny Qwen3 (actors/builtin_model.py)")
    builtin.add_argument("directory", type=Path)
    config = sub.add_parser("config", help="a config (preset name or config.json) with random weights")
    config.add_argument("config", help=f"one of {', '.join(PRESETS)}, or a config.json path")
    config.add_argument("directory", type=Path)
    config.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.kind == "builtin":
        from actors.builtin_model import build_builtin_model

        info = build_builtin_model(args.directory)
        info["random_weights"] = True
    else:
        info = build_random(config_from_arg(args.config), args.directory, args.dtype)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
