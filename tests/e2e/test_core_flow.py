"""The core flow through the real processes, driven by the unmodified tinker SDK."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL
from tests.e2e.pig_latin import chat_prompt, sft_batch, train_steps

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(service_client):
    """A training client after a short Pig Latin SFT, with its per-step losses."""
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=16, seed=7).result()
    tokenizer = tc.get_tokenizer()
    data = sft_batch(tokenizer)
    losses = train_steps(tc, data, steps=8)
    return tc, tokenizer, losses


def test_get_info_and_offline_tokenizer(trained):
    tc, tokenizer, _ = trained
    info = tc.get_info()
    assert info.model_data.model_name == BUILTIN_MODEL
    assert info.lora_rank == 16
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def test_pig_latin_sft_loss_falls(trained):
    _, _, losses = trained
    assert len(losses) == 8
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_forward_backward_outputs_per_datum_logprobs(trained):
    tc, tokenizer, _ = trained
    data = sft_batch(tokenizer, ["hello", "banana", "question"])
    out = tc.forward(data, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == 3
    total = 0.0
    for datum, outputs in zip(data, out.loss_fn_outputs):
        logprobs = outputs["logprobs"].to_numpy()
        weights = np.asarray(datum.loss_fn_inputs["weights"].to_numpy())
        assert logprobs.shape == weights.shape
        assert np.all(logprobs <= 0)
        np.testing.assert_allclose(outputs["elementwise_loss"].to_numpy(), -weights * logprobs, rtol=1e-5, atol=1e-6)
        total += float(-(weights * logprobs).sum())
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-4)


def test_custom_loss_matches_server_cross_entropy(service_client):
    """forward_backward_custom (negative weights on the wire) trains exactly like cross_entropy."""
    custom = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=3).result()
    reference = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=3).result()
    data = sft_batch(custom.get_tokenizer(), ["apple", "string"])

    def neg_log_likelihood(batch, logprobs_list):
        loss = sum(-(lp * torch.tensor(d.loss_fn_inputs["weights"].to_numpy())).sum()
                   for d, lp in zip(batch, logprobs_list))
        return loss, {"nll:sum": float(loss)}

    out = custom.forward_backward_custom(data, neg_log_likelihood).result()
    ref_out = reference.forward_backward(data, "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(ref_out.metrics["loss:sum"], rel=1e-5)
    assert "surrogate_loss:sum" in out.metrics
    adam = types.AdamParams(learning_rate=1e-2)
    custom.optim_step(adam).result()
    reference.optim_step(adam).result()
    after = [c.forward(data, "cross_entropy").result().metrics["loss:sum"] for c in (custom, reference)]
    assert after[0] == pytest.approx(after[1], rel=1e-4)
    assert after[0] < ref_out.metrics["loss:sum"]


def test_sample_from_trained_weights(trained):
    tc, tokenizer, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("hello"), add_special_tokens=False))
    params = types.SamplingParams(max_tokens=12, temperature=0.7, seed=11)
    result = sampler.sample(prompt=prompt, num_samples=4, sampling_params=params).result()
    assert len(result.sequences) == 4
    for seq in result.sequences:
        assert 1 <= len(seq.tokens) <= 12
        assert len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length")
        assert all(lp <= 0 for lp in seq.logprobs)
    again = sampler.sample(prompt=prompt, num_samples=4, sampling_params=params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in result.sequences]  # same seed


def test_compute_logprobs(trained):
    tc, tokenizer, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    tokens = tokenizer.encode(chat_prompt("world") + "orldway", add_special_tokens=False)
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert len(logprobs) == len(tokens)
    assert logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs[1:])


def test_engine_logprobs_equal_trainer_logprobs(trained):
    """For a sequence the engine sampled, the trainer's forward gives the same logprobs."""
    tc, tokenizer, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt_tokens = tokenizer.encode(chat_prompt("python"), add_special_tokens=False)
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=5, stop=[])
    seq = sampler.sample(prompt=types.ModelInput.from_ints(prompt_tokens), num_samples=1,
                         sampling_params=params).result().sequences[0]
    full = prompt_tokens + list(seq.tokens)
    datum = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)})
    trainer_logprobs = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    sampled_part = trainer_logprobs[len(prompt_tokens) - 1:]
    assert len(seq.tokens) == 16
    np.testing.assert_allclose(sampled_part, np.asarray(seq.logprobs), atol=1e-3)


def test_named_snapshot_does_not_drift(service_client):
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=1).result()
    tokenizer = tc.get_tokenizer()
    data = sft_batch(tokenizer, ["token", "answer"])
    train_steps(tc, data, steps=2)
    path = tc.save_weights_for_sampler(name="snap-1").result().path
    assert path.endswith("/sampler_weights/snap-1")
    sampler = service_client.create_sampling_client(model_path=path).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("token") + "okentay", add_special_tokens=False))
    before = sampler.compute_logprobs(prompt).result()
    train_steps(tc, data, steps=2)
    after = sampler.compute_logprobs(prompt).result()
    assert before == after
    live = tc.save_weights_and_get_sampling_client().result().compute_logprobs(prompt).result()
    assert live != before
