"""The Megatron trainer backend end to end: real clusters at TP2 and PP2, driven by the SDK.

Each cluster is `launch/cluster.py --trainer-backend megatron` with two torchrun ranks over
gloo, next to the session's torch-backend cluster; the same requests go to both and the
answers must agree (the torch backend is the reference the unit tests hold megatron to).
The PP2 cluster's state dir is then served by a torch-backend cluster, which resumes a
checkpoint the megatron backend wrote.
"""

from __future__ import annotations

import pytest
from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster
from tests.e2e.pig_latin import WORDS, chat_prompt, sft_batch, train_steps

pytest.importorskip("megatron.core", reason="install the extra: pip install -e '.[megatron]'")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MEGATRON = ("--trainer-backend", "megatron", "--trainer-ranks", "2")
ADAM = types.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, models_dir):
    with launch_cluster(tmp_path_factory.mktemp("tp2"), models_dir, *MEGATRON, "--tp", "2") as running:
        client = running.service_client()
        yield running, client
        client.close("success").result()


def _sft_losses(service_client, steps: int = 4) -> list[float]:
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=42).result()
    return train_steps(tc, sft_batch(tc.get_tokenizer(), WORDS[:7]), steps=steps)


def _rl_datums(sampler, tokenizer, words: list[str]) -> list[types.Datum]:
    """Two samples per prompt, advantages +1 / -1, the sampler's logprobs as Tinker RL wants them."""
    datums = []
    for word in words:
        prompt = tokenizer.encode(chat_prompt(word), add_special_tokens=False)
        params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3)
        result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params).result()
        for advantage, seq in zip((1.0, -1.0), result.sequences):
            full = prompt + list(seq.tokens)
            pad = [0.0] * (len(prompt) - 1)
            datums.append(types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={"target_tokens": full[1:], "logprobs": pad + list(seq.logprobs),
                                "advantages": pad + [advantage] * len(seq.tokens)}))
    return datums


def _rl_losses(service_client, loss_fn: str) -> list[float]:
    """Two RL steps: sample from the current weights, train on the samples."""
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=9).result()
    train_steps(tc, sft_batch(tc.get_tokenizer(), WORDS[:4]), steps=1)
    losses = []
    for _ in range(2):
        sampler = tc.save_weights_and_get_sampling_client().result()
        data = _rl_datums(sampler, tc.get_tokenizer(), WORDS[4:7])
        out = tc.forward_backward(data, loss_fn).result()
        tc.optim_step(ADAM).result()
        losses.append(out.metrics["loss:sum"])
    return losses


def test_tp2_sft_trains_like_the_torch_backend(tp2, service_client):
    _, client = tp2
    losses = _sft_losses(client)
    assert losses == pytest.approx(_sft_losses(service_client), rel=1e-4)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_tp2_rl_steps_like_the_torch_backend(tp2, service_client, loss_fn):
    _, client = tp2
    assert _rl_losses(client, loss_fn) == pytest.approx(_rl_losses(service_client, loss_fn), rel=1e-3, abs=1e-3)


def test_tp2_engine_logprobs_equal_trainer_logprobs(tp2):
    _, client = tp2
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=4).result()
    tokenizer = tc.get_tokenizer()
    train_steps(tc, sft_batch(tokenizer), steps=3)
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = tokenizer.encode(chat_prompt("python"), add_special_tokens=False)
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=5, stop=[])
    result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result()
    seq = result.sequences[0]
    full = prompt + list(seq.tokens)
    datum = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)})
    trainer = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert len(seq.tokens) == 16
    assert max(abs(a - b) for a, b in zip(trainer[len(prompt) - 1:], seq.logprobs)) <= 1e-3


def test_tp2_save_state_resumes_exactly_with_the_optimizer(tp2):
    _, client = tp2
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=6).result()
    data = sft_batch(tc.get_tokenizer(), WORDS[8:14])
    train_steps(tc, data, steps=3)
    path = tc.save_state("after-3").result().path
    resumed = client.create_training_client_from_state_with_optimizer(path).result()
    assert train_steps(resumed, data, steps=2) == train_steps(tc, data, steps=2)  # bit for bit


def test_tp2_cookbook_sl_loop(tp2, cookbook_hf_home, tmp_path):
    from tests.e2e.test_cookbook import assert_completed, run_pig_latin_sl_loop

    running, _ = tp2
    proc, metrics, rows = run_pig_latin_sl_loop(running, cookbook_hf_home, tmp_path, repeats=2)
    nll = [m["train_mean_nll"] for m in metrics]
    assert len(nll) == len(rows) // 8 and nll[-1] < nll[0], (nll, proc.stderr[-4000:])
    assert_completed(proc, running, tmp_path / "sl-run")


def test_pp2_trains_and_its_checkpoint_resumes_on_the_torch_backend(tmp_path, models_dir, service_client):
    state_dir = tmp_path / "pp2"
    with launch_cluster(state_dir, models_dir, *MEGATRON, "--pp", "2") as running:
        client = running.service_client()
        assert _sft_losses(client) == pytest.approx(_sft_losses(service_client), rel=1e-4)
        assert _rl_losses(client, "ppo") == pytest.approx(_rl_losses(service_client, "ppo"), rel=1e-3, abs=1e-3)
        tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=8).result()
        data = sft_batch(tc.get_tokenizer(), WORDS[:6])
        train_steps(tc, data, steps=3)
        path = tc.save_state("pp2-final").result().path
        expected = train_steps(tc, data, steps=2)
        client.close("success").result()
    with launch_cluster(state_dir, models_dir) as torch_cluster:  # the same state, the torch backend
        client = torch_cluster.service_client()
        resumed = client.create_training_client_from_state_with_optimizer(path).result()
        assert train_steps(resumed, data, steps=2) == pytest.approx(expected, rel=1e-4)
        client.close("success").result()
