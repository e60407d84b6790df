"""A tiny Pig Latin SFT data set and helpers to turn it into Tinker datums."""

from __future__ import annotations

WORDS = ["hello", "world", "banana", "apple", "string", "python", "tinker", "server",
         "model", "weights", "gradient", "token", "question", "answer", "please", "thank"]


def pig_latin(word: str) -> str:
    for i, ch in enumerate(word):
        if ch in "aeiou":
            return word[i:] + word[:i] + ("ay" if i else "way")
    return word + "ay"


def chat_prompt(word: str) -> str:
    return f"<|im_start|>user\n{word}<|im_end|>\n<|im_start|>assistant\n"


def sft_datum(tokenizer, word: str):
    """Prompt tokens weigh 0, the answer (and its end-of-turn token) weighs 1."""
    from tinker import types

    prompt = tokenizer.encode(chat_prompt(word), add_special_tokens=False)
    answer = tokenizer.encode(pig_latin(word) + "<|im_end|>", add_special_tokens=False)
    tokens = prompt + answer
    weights = [0.0] * len(prompt) + [1.0] * len(answer)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def sft_batch(tokenizer, words=WORDS[:8]):
    return [sft_datum(tokenizer, w) for w in words]


def train_steps(training_client, data, steps: int, learning_rate: float = 5e-3) -> list[float]:
    """Run `steps` forward_backward + optim_step pairs (submitted back to back); return losses."""
    from tinker import types

    losses = []
    for _ in range(steps):
        fwd = training_client.forward_backward(data, "cross_entropy")
        opt = training_client.optim_step(types.AdamParams(learning_rate=learning_rate))
        losses.append(fwd.result().metrics["loss:sum"])
        opt.result()
    return losses
