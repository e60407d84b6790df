"""The rules of SDK 0.38's sampling options, in one place (no torch here).

The API checks every sample request against them before anything is queued (a 400
naming the field), and the engine checks again as its last line of defence (a
ValueError). Messages use the SDK's field names, which is what the caller wrote.

Scoring ids or drawing alternatives at every prompt position costs (and returns) a
prompt-long column per id or draw, so both are bounded by MAX_PROMPT_SCORE_CELLS, as a
top-k width is bounded by the vocabulary.
"""

from __future__ import annotations

import numpy as np

from cluster.messages import EngineSampleReq, SampleReq

# len(prompt) × distinct target ids, and len(prompt) × prompt_alt_tokens_k, at most:
# 2^20 cells, e.g. a 4096-token prompt with 256 ids (4 MiB of float32 logprobs)
MAX_PROMPT_SCORE_CELLS = 1 << 20


def check_sample_options(req: SampleReq | EngineSampleReq, vocab_size: int) -> None:
    """Raise ValueError for an invalid option or combination; vocab_size 0 = unknown (unchecked)."""
    prompt_len = len(req.prompt_tokens)
    k = req.topk_sample_logprobs
    if k < 0 or (vocab_size and k > vocab_size):
        raise ValueError(f"topk_sample_logprobs must be in [0, {vocab_size or 'vocab size'}], got {k}")
    _check_last_n(req.prompt_logprobs_last_n, req.prompt_logprobs, prompt_len)
    if req.target_prompt_token_ids is not None:
        _check_target_ids(req.target_prompt_token_ids, req.target_prompt_listed, prompt_len, vocab_size)
    _check_alt_tokens_k(req.prompt_alt_tokens_k, prompt_len)


def _check_last_n(last_n: int | None, prompt_logprobs: bool, prompt_len: int) -> None:
    if last_n is None:
        return
    if not prompt_logprobs:
        raise ValueError("prompt_logprobs_last_n requires prompt_logprobs: true")
    if not 1 <= last_n <= prompt_len - 1:
        raise ValueError(f"prompt_logprobs_last_n must be in [1, len(prompt) - 1] = [1, {prompt_len - 1}], "
                         f"got {last_n}")


def _check_target_ids(ids: np.ndarray, listed: np.ndarray | None, prompt_len: int, vocab_size: int) -> None:
    if ids.ndim != 2 or ids.dtype != np.int64:
        raise ValueError(f"target_prompt_logprobs must be a 2-D int64 tensor [len(prompt) - 1, K], "
                         f"got {ids.dtype} of shape {list(ids.shape)}")
    if ids.shape[0] != prompt_len - 1:
        raise ValueError(f"target_prompt_logprobs must have len(prompt) - 1 = {prompt_len - 1} rows "
                         f"(row i scores prompt position i + 1), got {ids.shape[0]}")
    if listed is not None and (listed.dtype != np.bool_ or listed.shape != ids.shape):
        raise ValueError("target_prompt_listed must be a bool mask of target_prompt_logprobs' shape")
    named = ids[ids != -1]
    if not named.size:
        raise ValueError("target_prompt_logprobs names no token id: every cell is -1")
    if named.min() < 0 or (vocab_size and named.max() >= vocab_size):
        raise ValueError(f"target_prompt_logprobs ids must be -1 or in [0, {vocab_size or 'vocab size'}), "
                         f"got min {int(named.min())}, max {int(named.max())}")
    distinct = len(np.unique(named))
    if prompt_len * distinct > MAX_PROMPT_SCORE_CELLS:
        raise ValueError(f"target_prompt_logprobs costs len(prompt) × distinct ids = {prompt_len} × {distinct} "
                         f"> {MAX_PROMPT_SCORE_CELLS}; name fewer distinct ids")


def _check_alt_tokens_k(k: int, prompt_len: int) -> None:
    if k < 0:
        raise ValueError(f"prompt_alt_tokens_k must be >= 0, got {k}")
    if prompt_len * k > MAX_PROMPT_SCORE_CELLS:
        raise ValueError(f"prompt_alt_tokens_k costs len(prompt) × k = {prompt_len} × {k} > "
                         f"{MAX_PROMPT_SCORE_CELLS}; ask for fewer draws")


def check_engine_support(req: SampleReq | EngineSampleReq, unsupported: dict[str, str]) -> None:
    """Raise ValueError (with the engine's reason) for an option the serving engine backend cannot honour.

    `unsupported` is what engines report in their info: option name -> why ("seed": seeded
    sampling at temperature > 0, "prompt_alt_tokens_k": prompt draws).
    """
    if "seed" in unsupported and req.params.seed is not None and req.params.temperature > 0:
        raise ValueError(unsupported["seed"])
    if "prompt_alt_tokens_k" in unsupported and req.prompt_alt_tokens_k > 0:
        raise ValueError(unsupported["prompt_alt_tokens_k"])
