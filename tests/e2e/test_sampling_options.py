"""SDK 0.38's sampling options through the real processes: the numbers the SDK returns
are the trainer's `forward` logprobs on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL
from tests.e2e.pig_latin import chat_prompt, sft_batch, train_steps

pytestmark = pytest.mark.e2e

# fp32 on CPU: the engine (KV cache, batched) and the trainer reduce in different orders
ATOL = 1e-3


@pytest.fixture(scope="module")
def trained(service_client):
    """(training client, its sampling client, tokenizer) after a short Pig Latin SFT."""
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=11).result()
    tokenizer = tc.get_tokenizer()
    train_steps(tc, sft_batch(tokenizer, ["hello", "banana", "python", "tinker"]), steps=3)
    return tc, tc.save_weights_and_get_sampling_client().result(), tokenizer


@pytest.fixture(scope="module")
def prompt(trained) -> list[int]:
    tokenizer = trained[2]
    return tokenizer.encode(chat_prompt("banana") + "ananab", add_special_tokens=False)


def _trainer_logprobs(tc, model_input: list[int], target_ids: np.ndarray) -> np.ndarray:
    """The trainer's logprob of target_ids[t, j] after model_input[:t + 1], [len(model_input), K]."""
    targets = np.asarray(target_ids, dtype=np.int64).reshape(len(model_input), -1)
    datum = types.Datum(model_input=types.ModelInput.from_ints(model_input), loss_fn_inputs={
        "target_tokens": types.TensorData.from_numpy(targets),
        "weights": types.TensorData.from_numpy(np.ones(targets.shape, dtype=np.float32))})
    outputs = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]
    return outputs["logprobs"].to_numpy().reshape(targets.shape)


def _sample(sampler, prompt: list[int], max_tokens: int = 1, temperature: float = 1.0, seed: int | None = None,
            **options) -> types.SampleResponse:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=[])
    return sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params,
                          **options).result()


def test_topk_sample_logprobs_equal_the_trainers(trained, prompt):
    tc, sampler, _ = trained
    (seq,) = _sample(sampler, prompt, max_tokens=10, temperature=0.0, topk_sample_logprobs=5).sequences
    assert len(seq.topk_logprobs) == len(seq.tokens) == 10
    ids = np.array([[token for token, _ in row] for row in seq.topk_logprobs])
    logprobs = np.array([[lp for _, lp in row] for row in seq.topk_logprobs])
    assert ids.shape == (10, 5)
    assert ids[:, 0].tolist() == seq.tokens  # greedy: the token drawn is the top one
    assert (np.diff(logprobs, axis=1) <= 0).all()
    full = prompt + seq.tokens
    targets = np.zeros((len(full) - 1, 5), dtype=np.int64)
    targets[len(prompt) - 1:] = ids
    trainer = _trainer_logprobs(tc, full[:-1], targets)[len(prompt) - 1:]
    np.testing.assert_allclose(logprobs, trainer, atol=ATOL)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_target_prompt_logprobs_equal_the_trainers(trained, prompt, layout):
    tc, sampler, tokenizer = trained
    rng = np.random.default_rng(4)
    ids = torch.full((len(prompt) - 1, 4), -1, dtype=torch.int64)
    if layout == "dense":
        ids[:] = torch.from_numpy(rng.integers(0, len(tokenizer), size=ids.shape))
        ids[torch.from_numpy(rng.random(ids.shape) < 0.3)] = -1
        ids[:3] = -1  # rows before the first that names an id
        target = types.TensorData.from_torch(ids)
    else:
        ids[len(prompt) - 3, 0], ids[len(prompt) - 2, 1], ids[len(prompt) - 2, 3] = 17, 5, 300
        target = types.TensorData.from_torch_sparse(ids, pad_value=-1)
        assert target.sparse_crow_indices is not None
    result = _sample(sampler, prompt, target_prompt_logprobs=target)
    out = result.target_prompt_logprobs
    assert out.dtype == "float32" and out.shape == list(ids.shape)
    assert out.sparse_crow_indices == target.sparse_crow_indices
    assert out.sparse_col_indices == target.sparse_col_indices
    named = (ids != -1).numpy()
    trainer = _trainer_logprobs(tc, prompt[:-1], ids.clamp(min=0).numpy())
    values = out.to_numpy()
    np.testing.assert_allclose(values[named], trainer[named], atol=ATOL)
    assert (values[~named] == 0.0).all()


def test_prompt_logprobs_last_n_score_only_the_suffix(trained, prompt):
    tc, sampler, _ = trained
    last_n = 4
    result = _sample(sampler, prompt, include_prompt_logprobs=True, topk_prompt_logprobs=3,
                     prompt_logprobs_last_n=last_n)
    assert len(result.prompt_logprobs) == len(result.topk_prompt_logprobs) == len(prompt)
    assert all(lp is None for lp in result.prompt_logprobs[:-last_n])
    assert all(row is None for row in result.topk_prompt_logprobs[:-last_n])
    trainer = _trainer_logprobs(tc, prompt[:-1], np.array(prompt[1:]))[:, 0]  # entry i - 1: prompt[i]
    np.testing.assert_allclose(result.prompt_logprobs[-last_n:], trainer[-last_n:], atol=ATOL)
    top_rows = result.topk_prompt_logprobs[-last_n:]
    top_ids = np.zeros((len(prompt) - 1, 3), dtype=np.int64)
    top_ids[-last_n:] = [[token for token, _ in row] for row in top_rows]
    trainer_top = _trainer_logprobs(tc, prompt[:-1], top_ids)[-last_n:]
    np.testing.assert_allclose([[lp for _, lp in row] for row in top_rows], trainer_top, atol=ATOL)
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(prompt), prompt_logprobs_last_n=last_n).result()
    assert logprobs[:-last_n] == [None] * (len(prompt) - last_n)
    np.testing.assert_allclose(logprobs[-last_n:], trainer[-last_n:], atol=ATOL)


def test_prompt_alt_tokens_are_seeded_draws_with_the_trainers_logprobs(trained, prompt):
    tc, sampler, _ = trained
    result = _sample(sampler, prompt, temperature=1.0, seed=3, prompt_alt_tokens_k=4)
    tokens, logprobs = result.prompt_alt_tokens.tokens, result.prompt_alt_tokens.logprobs
    assert tokens.dtype == "int64" and logprobs.dtype == "float32"
    assert tokens.shape == logprobs.shape == [len(prompt) - 1, 4]
    trainer = _trainer_logprobs(tc, prompt[:-1], tokens.to_numpy())
    np.testing.assert_allclose(logprobs.to_numpy(), trainer, atol=ATOL)
    again = _sample(sampler, prompt, temperature=1.0, seed=3, prompt_alt_tokens_k=4)
    assert again.prompt_alt_tokens.tokens.to_numpy().tolist() == tokens.to_numpy().tolist()


def test_an_invalid_option_raises_with_the_servers_detail(trained, prompt):
    _, sampler, _ = trained
    one_row_short = types.TensorData.from_torch(torch.zeros((len(prompt) - 2, 1), dtype=torch.int64))
    with pytest.raises(tinker.BadRequestError, match=r"len\(prompt\) - 1 = \d+ rows"):
        _sample(sampler, prompt, target_prompt_logprobs=one_row_short)
