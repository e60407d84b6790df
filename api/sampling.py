"""asample: the JSON SampleRequest to `SampleReq`, and `SampleResult` to the wire.

The result goes out as a protobuf `SampleResponse` for the 0.38 SDK (it refuses JSON
here) and as JSON for SDKs up to 0.16. The rules of the 0.38 options are in
cluster/sample_options.py, shared with the engine; a request that breaks one is a 400
(the SDK raises when a response silently ignores an option).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from api import proto
from api.errors import bad_request
from api.forward_backward import check_token_ids, model_input_tokens_from_json
from api.json_fields import JsonObject
from api.tensors import nan_to_none, tensor_and_listed_cells_from_json, tensor_data_json, tensor_proto
from cluster.config import ModelConfig
from cluster.messages import SampledSequence, SampleReq, SampleResult, SamplingParams
from cluster.sample_options import check_sample_options

# the SDK lets max_tokens be None; like SamplingParams' own default (and vLLM's), 16
DEFAULT_MAX_TOKENS = 16
TOPK_SENTINEL_TOKEN, TOPK_SENTINEL_LOGPROB = 0, -99999.0  # an empty top-k cell, as the SDK reads it
_STOP_REASONS = {"stop": proto.StopReason.STOP_REASON_STOP, "length": proto.StopReason.STOP_REASON_LENGTH}


def sample_request_from_json(body: JsonObject, model: ModelConfig) -> SampleReq:
    prompt = model_input_tokens_from_json(body.get_object("prompt"))
    if not len(prompt):
        raise bad_request("prompt is empty: sampling needs at least one prompt token")
    check_token_ids("prompt", prompt, model.vocab_size)
    num_samples = body.get_int("num_samples", 1)
    if num_samples < 1:
        raise bad_request(f"num_samples must be >= 1, got {num_samples}")
    topk = body.get_int("topk_prompt_logprobs", 0)
    if topk < 0:
        raise bad_request(f"topk_prompt_logprobs must be >= 0, got {topk}")
    params = sampling_params_from_json(body.get_object("sampling_params"), model)
    if len(prompt) + params.max_tokens > model.max_context:
        raise bad_request("Prompt length plus max_tokens exceeds the model's context window: "
                          f"{len(prompt)} + {params.max_tokens} > {model.max_context}")
    if not body.has("sampling_session_id"):
        raise bad_request("sampling_session_id is required: create a sampling client first")
    target_ids, target_listed = _target_prompt_ids_from_json(body)
    req = SampleReq(sampling_session_id=body.get_str("sampling_session_id"), seq_id=body.get_int("seq_id"),
                    prompt_tokens=prompt, num_samples=num_samples, params=params,
                    prompt_logprobs=body.get_bool("prompt_logprobs", False), topk_prompt_logprobs=topk,
                    topk_sample_logprobs=body.get_int("topk_sample_logprobs", 0),
                    prompt_logprobs_last_n=body.get_int("prompt_logprobs_last_n", None),
                    target_prompt_token_ids=target_ids, target_prompt_listed=target_listed,
                    prompt_alt_tokens_k=body.get_int("prompt_alt_tokens_k", 0),
                    record_stability_info=body.get_bool("record_stability_info", False))
    try:
        check_sample_options(req, model.vocab_size)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return req


def _target_prompt_ids_from_json(body: JsonObject) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(ids, the cells a CSR request lists or None) of target_prompt_logprobs; (None, None) when absent."""
    if not body.has("target_prompt_logprobs"):
        return None, None
    tensor = body.get_object("target_prompt_logprobs")
    dtype = tensor.get_str("dtype")
    if dtype != "int64":
        raise bad_request(f"target_prompt_logprobs must be an int64 tensor of token ids, got dtype {dtype!r}")
    return tensor_and_listed_cells_from_json(tensor, pad_value=-1)


def sampling_params_from_json(params: JsonObject, model: ModelConfig) -> SamplingParams:
    max_tokens = params.get_int("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise bad_request(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
    temperature = params.get_float("temperature", 1.0)
    if not temperature >= 0:
        raise bad_request(f"sampling_params.temperature must be >= 0, got {temperature}")
    top_p = params.get_float("top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad_request(f"sampling_params.top_p must be in (0, 1], got {top_p}")
    top_k = params.get_int("top_k", -1)
    if top_k != -1 and top_k < 1:
        raise bad_request(f"sampling_params.top_k must be -1 (off) or >= 1, got {top_k}")
    seed = params.get_int("seed", None)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise bad_request("sampling_params.seed must fit in 64 bits")
    stop_strings, stop_token_ids, stop_at_eos = _stop_from_json(params, model)
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop_strings=stop_strings, stop_token_ids=stop_token_ids, stop_at_eos=stop_at_eos)


def _stop_from_json(params: JsonObject, model: ModelConfig) -> tuple[list[str], list[int], bool]:
    """(stop strings, stop token ids, stop at EOS): absent = EOS only; `[]` = run to max_tokens."""
    stop = params.value.get("stop")
    if stop is None:
        return [], [], True
    if isinstance(stop, str):
        return [stop], [], True
    if not isinstance(stop, list):
        raise bad_request("sampling_params.stop must be a string, a list of strings or a list of token ids")
    if not stop:
        return [], [], False
    if all(isinstance(s, str) for s in stop):
        return list(stop), [], True
    if all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        check_token_ids("sampling_params.stop", np.asarray(stop, dtype=np.int64), model.vocab_size)
        return [], list(stop), True
    raise bad_request("sampling_params.stop must be all strings or all token ids, not a mix")


# -- results -----------------------------------------------------------------------------


def _topk_proto(token_ids: np.ndarray, logprobs: np.ndarray):
    length, k = token_ids.shape
    return proto.TopkLogprobs(token_ids=np.ascontiguousarray(token_ids, dtype="<i4").tobytes(),
                              logprobs=np.ascontiguousarray(logprobs, dtype="<f4").tobytes(), k=k, length=length)


def _sequence_proto(sequence: SampledSequence):
    msg = proto.SampledSequence(stop_reason=_STOP_REASONS[sequence.stop_reason],
                                tokens=np.ascontiguousarray(sequence.tokens, dtype="<i4").tobytes())
    msg.logprobs = np.ascontiguousarray(sequence.logprobs, dtype="<f4").tobytes()
    if sequence.topk_token_ids is not None:
        msg.topk_sampled_logprobs.CopyFrom(_topk_proto(sequence.topk_token_ids, sequence.topk_logprobs))
    return msg


def sample_response_proto(result: SampleResult) -> bytes:
    msg = proto.SampleResponse(sequences=[_sequence_proto(s) for s in result.sequences])
    if result.prompt_logprobs is not None:
        msg.prompt_logprobs = np.ascontiguousarray(result.prompt_logprobs, dtype="<f4").tobytes()
    if result.topk_prompt_token_ids is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk_proto(result.topk_prompt_token_ids, result.topk_prompt_logprobs))
    if result.target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(tensor_proto(result.target_prompt_logprobs, result.target_prompt_listed))
    if result.prompt_alt_token_ids is not None:
        msg.prompt_alt_tokens.tokens.CopyFrom(tensor_proto(result.prompt_alt_token_ids))
        msg.prompt_alt_tokens.logprobs.CopyFrom(tensor_proto(result.prompt_alt_logprobs))
    return msg.SerializeToString()


def _topk_rows_json(token_ids: np.ndarray, logprobs: np.ndarray) -> list[list[list] | None]:
    """Rows of [token, logprob] pairs without sentinel cells; an all-sentinel row is None."""
    rows: list[list[list] | None] = []
    for ids, lps in zip(token_ids.tolist(), logprobs.tolist()):
        cells = [[t, lp] for t, lp in zip(ids, lps)
                 if not (t == TOPK_SENTINEL_TOKEN and lp == TOPK_SENTINEL_LOGPROB)]
        rows.append(cells or None)
    return rows


def _sequence_json(sequence: SampledSequence) -> dict[str, Any]:
    body = {"tokens": np.asarray(sequence.tokens).tolist(), "logprobs": np.asarray(sequence.logprobs).tolist(),
            "stop_reason": sequence.stop_reason}
    if sequence.topk_token_ids is not None:
        body["topk_logprobs"] = _topk_rows_json(np.asarray(sequence.topk_token_ids),
                                                np.asarray(sequence.topk_logprobs))
    return body


def sample_response_json(result: SampleResult) -> dict[str, Any]:
    body: dict[str, Any] = {"sequences": [_sequence_json(s) for s in result.sequences], "type": "sample"}
    if result.prompt_logprobs is not None:
        body["prompt_logprobs"] = nan_to_none(np.asarray(result.prompt_logprobs))
    if result.topk_prompt_token_ids is not None:
        body["topk_prompt_logprobs"] = _topk_rows_json(np.asarray(result.topk_prompt_token_ids),
                                                       np.asarray(result.topk_prompt_logprobs))
    if result.target_prompt_logprobs is not None:
        body["target_prompt_logprobs"] = tensor_data_json(result.target_prompt_logprobs, result.target_prompt_listed)
    if result.prompt_alt_token_ids is not None:
        body["prompt_alt_tokens"] = {"tokens": tensor_data_json(result.prompt_alt_token_ids),
                                     "logprobs": tensor_data_json(result.prompt_alt_logprobs)}
    return body
