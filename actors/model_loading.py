"""Load a base causal LM and its tokenizer: a hub id or a local directory, same code."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.to(device)
    model.eval()  # no dropout: training and sampling see the same function
    return model


@contextlib.contextmanager
def start_up_threads(threads: int | None = None) -> Iterator[None]:
    """Load the model and allocate its slots on one thread, then compute on `threads` (default: torch's own).

    A start-up is a few hundred small copies and zero-fills that a second thread cannot speed up, while each of
    them is an OpenMP parallel region whose threads spin-wait for each other: with the trainer and the engine
    starting at once on two cores (or any other load), a peer thread is often preempted, and a trainer rank's
    slots and AdamW state took 0.3-2 s instead of ~0.07 s, seconds of CPU taken from the other process's start.
    """
    after = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(after)


# Below this many tokens a trainer pass or an engine forward (prefill, decode step) runs on one thread: a small
# pass is hundreds of tiny parallel regions, each a hand-off to the peer thread, which the API, controller and
# client processes need on the other core meanwhile. Measured on the 2-core dev VM (built-in model, one LoRA,
# passive OpenMP waits): one thread took 14-15 ms per 8-token forward + backward against 16-17 for two, was level
# at 64-128 tokens and lost from 256 on (75-84 ms against 66-70). In a server the 8-token round trip took 29 ms
# instead of 41.
SMALL_PASS_TOKENS = 192


@contextlib.contextmanager
def compute_threads(tokens: int, threads: int | None) -> Iterator[None]:
    """Compute on one thread if the work is `tokens` few (a pass's padded rows x width, a prefill's new
    tokens, a decode step's rows), else on `threads`; None (a GPU's work): leave the threads alone."""
    if threads is None:
        yield
        return
    wanted = 1 if tokens < SMALL_PASS_TOKENS else threads
    before = torch.get_num_threads()
    if wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)
