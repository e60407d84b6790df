"""The built-in model: a tiny Qwen3 with random weights and its own byte-level BPE tokenizer.

No machine here reaches a model hub, so tinkerd can build a small model
deterministically: the same files, byte for byte, on every machine. It is the default
model of launch/cluster.py and of the tests. Real models load through the very same
`load_causal_lm` path (a hub id or a local directory).

Run: python -m actors.builtin_model DIR   (prints the model's summary as JSON)
"""

from __future__ import annotations

import argparse
import json
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


def build_builtin_model(directory: str | Path) -> dict:
    """Create the built-in model in `directory` unless it is already complete there."""
    directory = Path(directory)
    marker = directory / "tinkerd_builtin.json"
    if marker.exists():
        return {**json.loads(marker.read_text()), "path": str(directory)}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    print(json.dumps(build_builtin_model(parser.parse_args().directory)))


if __name__ == "__main__":
    main()
