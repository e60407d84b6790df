"""The Tinker <-> SGLang request mapping (actors/engine/sglang/requests.py), without SGLang.

The real engine's answers to these mappings are checked in tests/e2e/test_sglang_backend.py;
here each rule is pinned down on its own, with SGLang's output shapes as observed
(entry e of input logprobs from logprob_start_len s is position s + e, entry 0 unscored).
"""

from __future__ import annotations

import numpy as np
import pytest

from actors.engine.sglang.requests import (
    NO_PROMPT_LOGPROBS, check_supported, generate_kwargs, sample_result, sample_seed, unsupported_options,
)
from cluster.messages import EngineSampleReq, SamplingParams
from cluster.sample_options import check_engine_support


def _req(prompt=(5, 6, 7, 8, 9), n=1, **fields) -> EngineSampleReq:
    params = fields.pop("params", SamplingParams(max_tokens=3, temperature=0.0))
    return EngineSampleReq(adapter_id=None, prompt_tokens=np.asarray(prompt, dtype=np.int64), num_samples=n,
                           params=params, **fields)


def test_sampling_fields_map_per_sample():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=0, top_p=0.9, seed=3, stop_strings=["x"],
                            stop_token_ids=[4])
    kwargs = generate_kwargs(_req(n=3, params=params), "1:run@2", ["a", "b", "c"], seeds_reproduce=True)
    assert kwargs["input_ids"] == [[5, 6, 7, 8, 9]] * 3 and kwargs["lora_path"] == ["1:run@2"] * 3
    first = kwargs["sampling_params"][0]
    assert first == {"max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "stop": ["x"],
                     "stop_token_ids": [4], "sampling_seed": sample_seed(3, 0)}
    seeds = [p["sampling_seed"] for p in kwargs["sampling_params"]]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert kwargs["logprob_start_len"] == [NO_PROMPT_LOGPROBS] * 3  # nothing asked of the prompt


def test_explicit_empty_stop_ignores_eos_and_no_seed_where_it_cannot_reproduce():
    params = SamplingParams(max_tokens=2, temperature=0.0, seed=9, stop_at_eos=False)
    (p,) = generate_kwargs(_req(params=params), None, ["a"], seeds_reproduce=False)["sampling_params"]
    assert p["ignore_eos"] is True and "stop" not in p and "sampling_seed" not in p


def test_only_sample_zero_scores_the_prompt_from_one_before_the_first_position_read():
    target = np.full((4, 2), -1, dtype=np.int64)
    target[2, 0] = 11  # position 3
    req = _req(n=2, prompt_logprobs=True, prompt_logprobs_last_n=3, topk_prompt_logprobs=4, topk_sample_logprobs=1,
               target_prompt_token_ids=target)
    kwargs = generate_kwargs(req, None, ["a", "b"], seeds_reproduce=False)
    assert kwargs["logprob_start_len"] == [1, NO_PROMPT_LOGPROBS]  # first position read is 2 (= 5 - 3)
    assert kwargs["top_logprobs_num"] == [4, 1]
    assert kwargs["token_ids_logprob"] == [[11], None]


def _meta(output_ids, start, prompt):
    """SGLang's meta_info for one item, with made-up logprobs: -position for prompt tokens."""
    scored = [[None if i == 0 else -float(start + i), tok, None] for i, tok in enumerate(prompt[start:])]
    top = [None if i == 0 else [[-0.5, 1, None], [-0.7, 2, None]] for i in range(len(prompt) - start)]
    ids = [None if i == 0 else [[-10.0 - start - i, 11, None]] for i in range(len(prompt) - start)]
    return {"output_ids": output_ids, "meta_info": {
        "finish_reason": {"type": "stop", "matched": 3}, "output_token_logprobs": [[-1.0, t, None] for t in output_ids],
        "output_top_logprobs": [[[-1.0, t, None]] for t in output_ids],
        "input_token_logprobs": scored, "input_top_logprobs": top, "input_token_ids_logprobs": ids}}


def test_outputs_become_the_torch_engines_result_layout():
    prompt = [5, 6, 7, 8, 9]
    target = np.full((4, 2), -1, dtype=np.int64)
    target[2, 0] = 11
    req = _req(prompt, n=2, prompt_logprobs=True, prompt_logprobs_last_n=3, topk_prompt_logprobs=2,
               topk_sample_logprobs=1, target_prompt_token_ids=target)
    result = sample_result(req, [_meta([3, 4], 1, prompt), _meta([3], 1, prompt)])
    assert [s.tokens.tolist() for s in result.sequences] == [[3, 4], [3]]
    assert result.sequences[0].stop_reason == "stop" and result.sequences[0].topk_token_ids.tolist() == [[3], [4]]
    np.testing.assert_array_equal(result.prompt_logprobs, [np.nan, np.nan, -2.0, -3.0, -4.0])
    assert result.topk_prompt_token_ids.tolist() == [[0, 0], [0, 0], [1, 2], [1, 2], [1, 2]]
    assert result.target_prompt_logprobs[2, 0] == -13.0 and result.target_prompt_logprobs[2, 1] == 0.0


def test_an_abort_is_an_error_not_a_stop_reason():
    meta = _meta([3], 0, [5, 6])
    meta["meta_info"]["finish_reason"] = {"type": "abort", "message": "scheduler gone"}
    with pytest.raises(RuntimeError, match="scheduler gone"):
        sample_result(_req((5, 6)), [meta])


def test_refusals_name_the_option_and_are_the_same_at_submission():
    seeded = _req(params=SamplingParams(temperature=1.0, seed=1))
    with pytest.raises(ValueError, match="seed is not supported"):
        check_supported(seeded, seeds_reproduce=False)
    check_supported(seeded, seeds_reproduce=True)
    check_supported(_req(params=SamplingParams(temperature=0.0, seed=1)), seeds_reproduce=False)  # greedy: moot
    with pytest.raises(ValueError, match="prompt_alt_tokens_k is not supported"):
        check_engine_support(_req(prompt_alt_tokens_k=2), unsupported_options(seeds_reproduce=True))


def test_engine_arguments_per_device():
    """CPU: the pure-torch paths; CUDA: SGLang's kernels, seeds that reproduce, weights that survive a release."""
    from actors.engine.sglang.backend import server_args
    from cluster.config import ClusterConfig, EngineConfig, ModelConfig

    model = ModelConfig(path="/m", name="m", max_context=2048)
    cpu = server_args(ClusterConfig(model=model, engine=EngineConfig(max_lora_rank=16, max_loras_per_batch=3)))
    assert (cpu["attention_backend"], cpu["lora_backend"], cpu["disable_cuda_graph"]) == ("torch_native",) * 2 + (True,)
    assert cpu["lora_target_modules"] == ["all"] and cpu["max_lora_rank"] == 16 and cpu["max_loras_per_batch"] == 3
    assert cpu["disable_overlap_schedule"] and cpu["context_length"] == 2048 and "enable_memory_saver" not in cpu
    cuda = server_args(ClusterConfig(model=model, engine=EngineConfig(device="cuda", dtype="bfloat16")))
    assert cuda["enable_deterministic_inference"] and cuda["enable_memory_saver"] and cuda["enable_weights_cpu_backup"]
    assert "attention_backend" not in cuda and cuda["dtype"] == "bfloat16"
