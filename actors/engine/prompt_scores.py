"""What a request asks about its own prompt, computed from its prefill logits.

- `prompt_logprobs` / `topk_prompt_logprobs`: entry i is log p(prompt[i] | prompt[:i]),
  or the top k there; entry 0 has no context (NaN / an all-sentinel row), and with
  `prompt_logprobs_last_n` = N so has every entry before the last N.
- `target_prompt_logprobs`: cell [i, j] is the logprob of the id in that cell of the
  request at prompt position i + 1; 0.0 where the request had -1.
- `prompt_alt_tokens_k`: k draws per prompt position after the first, with replacement,
  at the request's temperature (top-k / top-p do not apply), and their logprobs.

Every logprob is the raw model's (`raw_logprobs`). A request reads the logits of its
last `prompt_logits_needed` positions only, and the prefill keeps no more logits than the
neediest request of the batch reads: positions before the last N, or before the first
target row that names an id, are never scored.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.engine.sampling import draw_tokens, prompt_alt_tokens_generator, raw_logprobs
from cluster.messages import EngineSampleReq, SampleResult

# Sentinel of an empty top-k cell (Tinker's TopkLogprobs convention); an all-sentinel row reads as None.
TOPK_SENTINEL_ID = 0
TOPK_SENTINEL_LOGPROB = -99999.0


def scores_prompt(spec: EngineSampleReq) -> bool:
    """Whether the request asks anything of its prompt (so its prefill logits get read)."""
    return (spec.prompt_logprobs or spec.topk_prompt_logprobs > 0 or spec.target_prompt_token_ids is not None
            or spec.prompt_alt_tokens_k > 0)


def prompt_logits_needed(spec: EngineSampleReq) -> int:
    """How many trailing prompt positions' logits the request reads (the last one also picks its first token)."""
    prompt_len = len(spec.prompt_tokens)
    needed = 1
    if spec.prompt_logprobs or spec.topk_prompt_logprobs > 0:
        last_n = spec.prompt_logprobs_last_n
        needed = prompt_len if last_n is None else last_n + 1
    if spec.target_prompt_token_ids is not None:
        first_row = int(np.flatnonzero((spec.target_prompt_token_ids != -1).any(axis=1))[0])
        needed = max(needed, prompt_len - first_row)
    if spec.prompt_alt_tokens_k > 0:
        needed = prompt_len
    return needed


def record_prompt_scores(spec: EngineSampleReq, prompt: torch.Tensor, logits: torch.Tensor,
                         result: SampleResult) -> None:
    """Fill `result` from the request's prefill logits [T, V] (left-padded: its positions are the last rows)."""
    needed = prompt_logits_needed(spec)
    first = len(prompt) - needed  # the first prompt position read
    read = logits[logits.shape[0] - needed:-1]  # row r: position first + r, predicting prompt[first + r + 1]
    logprobs = raw_logprobs(read)
    if spec.prompt_logprobs or spec.topk_prompt_logprobs > 0:
        start = _first_scored(spec, len(prompt))  # entry `start` is predicted at position start - 1
        _record_prompt_logprobs(spec, prompt, logprobs[start - 1 - first:], result)
    if spec.target_prompt_token_ids is not None:
        result.target_prompt_logprobs = _target_logprobs(spec.target_prompt_token_ids, logprobs, first)
        result.target_prompt_listed = spec.target_prompt_listed
    if spec.prompt_alt_tokens_k > 0:  # first is 0 here: every position is read
        temperature = spec.params.temperature
        generator = prompt_alt_tokens_generator(spec.params.seed) if temperature > 0 else None
        tokens = draw_tokens(read, temperature, generator, spec.prompt_alt_tokens_k)
        result.prompt_alt_token_ids = tokens.cpu().numpy().astype(np.int64)
        result.prompt_alt_logprobs = logprobs.gather(1, tokens).cpu().numpy()


def _first_scored(spec: EngineSampleReq, prompt_len: int) -> int:
    """The first prompt entry that gets a logprob: 1, or the first of the last N."""
    last_n = spec.prompt_logprobs_last_n
    return 1 if last_n is None else prompt_len - last_n


def _record_prompt_logprobs(spec: EngineSampleReq, prompt: torch.Tensor, scored: torch.Tensor,
                            result: SampleResult) -> None:
    """`scored` [m, V]: the raw logprobs predicting the last m prompt tokens, the scored ones."""
    n = len(prompt)
    start = n - scored.shape[0]
    if spec.prompt_logprobs:
        values = np.full(n, np.nan, dtype=np.float32)
        values[start:] = scored.gather(1, prompt[start:].unsqueeze(1)).squeeze(1).cpu().numpy()
        result.prompt_logprobs = values
    k = spec.topk_prompt_logprobs
    if k > 0:
        ids = np.full((n, k), TOPK_SENTINEL_ID, dtype=np.int32)
        values = np.full((n, k), TOPK_SENTINEL_LOGPROB, dtype=np.float32)
        top = scored.topk(k, dim=-1)
        ids[start:] = top.indices.cpu().numpy()
        values[start:] = top.values.cpu().numpy()
        result.topk_prompt_token_ids = ids
        result.topk_prompt_logprobs = values


def _target_logprobs(ids: np.ndarray, logprobs: torch.Tensor, first: int) -> np.ndarray:
    """Cell [i, j]: logprob of ids[i, j] at position i + 1, i.e. `logprobs` row i - first; 0.0 for -1."""
    values = np.zeros(ids.shape, dtype=np.float32)
    rows, cols = np.nonzero(ids != -1)
    device = logprobs.device
    picked = logprobs[torch.as_tensor(rows - first, device=device), torch.as_tensor(ids[rows, cols], device=device)]
    values[rows, cols] = picked.cpu().numpy()
    return values
