"""Tinker sample requests in SGLang's terms, and SGLang's outputs back as a SampleResult (numpy only).

One EngineSampleReq of n samples becomes one `Engine.async_generate` call over a batch
of n copies of the prompt, item i being sample i. Only item 0 scores the prompt; the
others ask for the logprobs of their own tokens only. SGLang's input logprobs from
`logprob_start_len` = s cover prompt positions s.. with position s itself unscored (None),
so a request that reads position p onwards asks for s = p - 1.

Field by field:
- `max_tokens` → `max_new_tokens`; `temperature`, `top_p` as they are; `top_k` ≤ 0 → -1 (off).
  Temperature 0 is greedy in both.
- stop strings → `stop`, stop token ids → `stop_token_ids`; both keep the token that
  completes the stop, as the torch engine does. `stop_at_eos` off (Tinker's explicit
  `stop: []`) → `ignore_eos`, which in SGLang also disables `stop_token_ids`; Tinker never
  sends both. Finish reasons: SGLang's "stop" (a token or a string) → "stop", "length" → "length".
- logprobs: the engine process sets SGLANG_RETURN_ORIGINAL_LOGPROB=1, so the logprob of a
  sampled token is the raw model's (temperature 1, unfiltered), like the torch engine's
  and the trainer's. `topk_sample_logprobs` and `topk_prompt_logprobs` share SGLang's one
  `top_logprobs_num` (the larger of the two, each cut to its own k);
  `target_prompt_token_ids` → `token_ids_logprob` with every id the request names.
- `seed`: SGLang seeds per request only under `enable_deterministic_inference`, which
  needs a CUDA attention backend. Where the engine has it, sample i gets seed
  `sample_seed(seed, i)`; where not (CPU), a seeded request with temperature > 0 is
  refused: an unreproducible "seeded" sample would be a silently ignored setting.
- `prompt_alt_tokens_k` (draws at prompt positions) has no SGLang counterpart and is refused.
"""

from __future__ import annotations

import numpy as np

from cluster.messages import EngineSampleReq, SampledSequence, SampleResult
from cluster.sample_options import check_engine_support

# Tinker's TopkLogprobs convention for an empty top-k cell (the torch engine's, actors/engine/prompt_scores.py)
TOPK_SENTINEL_ID = 0
TOPK_SENTINEL_LOGPROB = -99999.0
NO_PROMPT_LOGPROBS = -1  # SGLang's logprob_start_len for "the output tokens only"


ALT_TOKENS_REFUSAL = ("prompt_alt_tokens_k is not supported by the sglang engine backend (SGLang cannot draw "
                      "tokens at prompt positions); use the torch engine backend for it")
SEED_REFUSAL = ("seed is not supported by the sglang engine backend on this device: SGLang reproduces seeded "
                "samples only with deterministic inference, which its CPU attention backend (torch_native) "
                "lacks; drop the seed, or serve with --engine-backend torch")


def unsupported_options(seeds_reproduce: bool) -> dict[str, str]:
    """What this backend refuses, and why (reported in the engine's info, checked at submission too)."""
    unsupported = {"prompt_alt_tokens_k": ALT_TOKENS_REFUSAL}
    if not seeds_reproduce:
        unsupported["seed"] = SEED_REFUSAL
    return unsupported


def check_supported(req: EngineSampleReq, seeds_reproduce: bool) -> None:
    """Refuse (ValueError, a 400) what this backend cannot honour, before anything is queued."""
    check_engine_support(req, unsupported_options(seeds_reproduce))


def first_scored_position(req: EngineSampleReq) -> int | None:
    """The first prompt position whose logprob the request reads (None: it reads none)."""
    first = None
    if req.prompt_logprobs or req.topk_prompt_logprobs > 0:
        first = 1 if req.prompt_logprobs_last_n is None else len(req.prompt_tokens) - req.prompt_logprobs_last_n
    if req.target_prompt_token_ids is not None:
        rows = np.flatnonzero((req.target_prompt_token_ids != -1).any(axis=1))
        target_first = int(rows[0]) + 1  # row i scores position i + 1
        first = target_first if first is None else min(first, target_first)
    return first


def sample_seed(seed: int, sample_index: int) -> int:
    """Sample i's own 63-bit seed, well spread and the same on every platform."""
    sequence = np.random.SeedSequence([seed % 2**64, sample_index])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def generate_kwargs(req: EngineSampleReq, lora_name: str | None, rids: list[str], seeds_reproduce: bool) -> dict:
    """The keyword arguments of `Engine.async_generate` for all n samples of `req`."""
    n, prompt = req.num_samples, [int(t) for t in req.prompt_tokens]
    first = first_scored_position(req)
    top_sample = req.topk_sample_logprobs
    params = []
    for i in range(n):
        p = {"max_new_tokens": req.params.max_tokens, "temperature": req.params.temperature,
             "top_p": req.params.top_p, "top_k": req.params.top_k if req.params.top_k > 0 else -1}
        if req.params.stop_at_eos:
            p["stop"] = list(req.params.stop_strings)
            p["stop_token_ids"] = list(req.params.stop_token_ids)
        else:
            p["ignore_eos"] = True
        if req.params.seed is not None and seeds_reproduce:
            p["sampling_seed"] = sample_seed(req.params.seed, i)
        params.append(p)
    scoring_top = max(top_sample, req.topk_prompt_logprobs)
    kwargs = {
        "input_ids": [prompt] * n, "sampling_params": params, "rid": rids, "return_logprob": [True] * n,
        "logprob_start_len": [NO_PROMPT_LOGPROBS if i or first is None else first - 1 for i in range(n)],
        "top_logprobs_num": [scoring_top if i == 0 and first is not None else top_sample for i in range(n)],
        "lora_path": [lora_name] * n,
    }
    if req.target_prompt_token_ids is not None:
        named = sorted({int(t) for t in np.unique(req.target_prompt_token_ids) if t != -1})
        kwargs["token_ids_logprob"] = [named if i == 0 else None for i in range(n)]
    return kwargs


def sample_result(req: EngineSampleReq, outputs: list[dict]) -> SampleResult:
    """The SampleResult of `req` from its n SGLang outputs (item i = sample i)."""
    result = SampleResult(sequences=[_sequence(req, out) for out in outputs])
    first = first_scored_position(req)
    if first is not None:
        _record_prompt_scores(req, outputs[0]["meta_info"], first, result)
    return result


def finish_reason(meta_info: dict) -> str:
    reason = meta_info.get("finish_reason") or {}
    kind = reason.get("type")
    if kind == "stop":
        return "stop"
    if kind == "length":
        return "length"
    raise RuntimeError(f"SGLang ended the request with {reason!r}: {reason.get('message', 'no message')}")


def _sequence(req: EngineSampleReq, out: dict) -> SampledSequence:
    meta = out["meta_info"]
    tokens = np.asarray(out["output_ids"], dtype=np.int32)
    logprobs = np.asarray([entry[0] for entry in meta["output_token_logprobs"]], dtype=np.float32)
    sequence = SampledSequence(tokens=tokens, logprobs=logprobs, stop_reason=finish_reason(meta))
    k = req.topk_sample_logprobs
    if k > 0:
        sequence.topk_token_ids, sequence.topk_logprobs = _topk_rows(meta["output_top_logprobs"], k)
    return sequence


def _topk_rows(rows: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """SGLang's per-position top lists of (logprob, id, text) → int32 / float32 [positions, k]."""
    ids = np.full((len(rows), k), TOPK_SENTINEL_ID, dtype=np.int32)
    values = np.full((len(rows), k), TOPK_SENTINEL_LOGPROB, dtype=np.float32)
    for r, row in enumerate(rows):
        for c, entry in enumerate((row or [])[:k]):
            values[r, c], ids[r, c] = entry[0], entry[1]
    return ids, values


def _record_prompt_scores(req: EngineSampleReq, meta: dict, first: int, result: SampleResult) -> None:
    """Fill the prompt fields from item 0's input logprobs, whose entry e is prompt position first - 1 + e."""
    n = len(req.prompt_tokens)
    first -= 1  # SGLang's logprob_start_len: the first entry, unscored
    start = 1 if req.prompt_logprobs_last_n is None else n - req.prompt_logprobs_last_n
    if req.prompt_logprobs:
        values = np.full(n, np.nan, dtype=np.float32)
        scored = meta["input_token_logprobs"]
        for position in range(start, n):
            values[position] = scored[position - first][0]
        result.prompt_logprobs = values
    k = req.topk_prompt_logprobs
    if k > 0:
        ids = np.full((n, k), TOPK_SENTINEL_ID, dtype=np.int32)
        values = np.full((n, k), TOPK_SENTINEL_LOGPROB, dtype=np.float32)
        top = meta["input_top_logprobs"]
        ids[start:], values[start:] = _topk_rows(top[start - first:n - first], k)
        result.topk_prompt_token_ids, result.topk_prompt_logprobs = ids, values
    if req.target_prompt_token_ids is not None:
        result.target_prompt_logprobs = _target_logprobs(req.target_prompt_token_ids,
                                                         meta["input_token_ids_logprobs"], first)
        result.target_prompt_listed = req.target_prompt_listed


def _target_logprobs(ids: np.ndarray, scored: list, first: int) -> np.ndarray:
    """Cell [i, j]: the logprob of ids[i, j] at prompt position i + 1; 0.0 where the request had -1."""
    values = np.zeros(ids.shape, dtype=np.float32)
    for i in np.flatnonzero((ids != -1).any(axis=1)):
        by_id = {entry[1]: entry[0] for entry in scored[i + 1 - first]}
        for j in np.flatnonzero(ids[i] != -1):
            values[i, j] = by_id[int(ids[i, j])]
    return values
