"""The built-in model: a tiny Qwen3 with random weights and its own byte-level BPE tokenizer.

No machine here reaches a model hub, so tinkerd can build a small model
deterministically: the same files, byte for byte, on every machine. It is the default
model of launch/cluster.py and of the tests. Real models load through the very same
`load_causal_lm` path (a hub id or a local directory).

Run: python -m actors.builtin_model DIR [--hf-home HF_HOME]   (prints the model's summary as JSON)

`--hf-home` also installs the model into a Hugging Face cache under HF_HOME, as
`hub/models--tinkerd--tiny-qwen3`, so that clients find it by its served name offline
(`AutoTokenizer.from_pretrained("tinkerd/tiny-qwen3")` with `HF_HOME=HF_HOME
HF_HUB_OFFLINE=1`): the SDK's `SamplingClient.get_tokenizer()` and tinker-cookbook's
`get_tokenizer()`, which look a tokenizer up by the base model's name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_MODEL_NAME = "tinkerd/tiny-qwen3"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
    "boxing matches and every hungry student learns to translate english words into "
    "pig latin by moving the first consonant cluster to the end and adding ay or way "
    "hello world banana apple string python tinker server training sampling model "
    "weights adapter gradient optimizer learning rate loss token sequence batch "
    "question answer user assistant system please thank you yes no maybe one two "
    "three four five six seven eight nine ten zero plus minus equals number"
).split()
_MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)


def _pig_latin(word: str) -> str:
    for i, ch in enumerate(word):
        if ch in "aeiou":
            return word[i:] + word[:i] + ("ay" if i else "way")
    return word + "ay"


def _training_corpus() -> list[str]:
    lines = []
    for i, word in enumerate(_CORPUS_WORDS):
        nxt = _CORPUS_WORDS[(i * 7 + 3) % len(_CORPUS_WORDS)]
        lines.append(f"{word} {nxt} -> {_pig_latin(word)} {_pig_latin(nxt)}")
        lines.append(f"<|im_start|>user\n{word} {nxt}<|im_end|>\n<|im_start|>assistant\n{_pig_latin(word)}<|im_end|>")
    lines.append(" ".join(_CORPUS_WORDS))
    lines.append("0123456789 .,;:!?'\"()[]{}<>+-*/=_#@$%&|\\^~` \t\n")
    return lines


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return fast


def built_model(directory: str | Path) -> dict | None:
    """The summary of the built-in model if it is complete in `directory`, else None; torch-free, so the launcher
    reads it in its own process (a subprocess only when the model has to be built)."""
    marker = Path(directory) / "tinkerd_builtin.json"
    if not marker.exists():
        return None
    return {**json.loads(marker.read_text()), "path": str(directory)}


def build_builtin_model(directory: str | Path) -> dict:
    """Create the built-in model in `directory` unless it is already complete there."""
    directory = Path(directory)
    if (built := built_model(directory)) is not None:
        return built
    marker = directory / "tinkerd_builtin.json"
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **_MODEL_CONFIG,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(directory), safe_serialization=True)
    summary = {
        "name": BUILTIN_MODEL_NAME,
        "arch": "qwen3",
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    marker.write_text(json.dumps(summary, indent=2))
    return {**summary, "path": str(directory)}


def hf_cache_repo_dir(hf_home: str | Path, name: str = BUILTIN_MODEL_NAME) -> Path:
    """Where the Hugging Face cache under `hf_home` keeps the model repo `name` (`org/model`)."""
    return Path(hf_home).expanduser() / "hub" / ("models--" + name.replace("/", "--"))


def install_into_hf_cache(model_dir: str | Path, hf_home: str | Path, name: str = BUILTIN_MODEL_NAME) -> Path:
    """Make `model_dir` loadable offline as the hub repo `name` from the HF cache under `hf_home`.

    Writes the cache layout huggingface_hub reads with HF_HUB_OFFLINE=1:
    `HF_HOME/hub/models--ORG--MODEL/refs/main` holding a revision, and
    `snapshots/<revision>/` holding the files (tokenizer files, config.json, weights;
    transformers wants config.json even to load a tokenizer by name). The revision is a
    hash of the files, so installing the same model again changes nothing, and a changed
    model gets a new snapshot that refs/main then points at. Returns the snapshot dir.
    """
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and p.name != "tinkerd_builtin.json" and not p.name.startswith("."))
    if not any(p.name == "config.json" for p in files) or not any(p.name.startswith("tokenizer") for p in files):
        raise FileNotFoundError(f"{model_dir} has no config.json or tokenizer files")
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    revision = digest.hexdigest()
    repo = hf_cache_repo_dir(hf_home, name)
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        (repo / "snapshots").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{revision}.", dir=repo / "snapshots"))
        try:
            for path in files:
                shutil.copyfile(path, staging / path.name)
            staging.rename(snapshot)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not snapshot.is_dir():  # not merely another process having won the race
                raise
    refs = repo / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    tmp_ref = refs / f".main.{os.getpid()}"
    tmp_ref.write_text(revision)
    tmp_ref.replace(refs / "main")
    return snapshot


def installed(info: dict, hf_home: str | Path) -> dict:
    """`info` of a built model, once the model is installed into the HF cache under `hf_home` too."""
    install_into_hf_cache(info["path"], hf_home, info["name"])
    return {**info, "hf_home": str(Path(hf_home).expanduser().resolve())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--hf-home", help="also install the model into the Hugging Face cache under this HF_HOME")
    args = parser.parse_args()
    info = build_builtin_model(args.directory)
    print(json.dumps(installed(info, args.hf_home) if args.hf_home else info))


if __name__ == "__main__":
    main()
