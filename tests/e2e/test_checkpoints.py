"""Training checkpoints through the SDK: save_state, load_state, create-from-state; resume is exact."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import BUILTIN_MODEL
from tests.e2e.pig_latin import WORDS, sft_batch, train_steps

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def saved(service_client):
    """A run trained 2 steps, checkpointed, then trained 3 more steps (losses L1)."""
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=5).result()
    data = sft_batch(tc.get_tokenizer(), WORDS[4:10])
    train_steps(tc, data, steps=2, learning_rate=2e-3)
    path = tc.save_state("after-2").result().path
    l1 = train_steps(tc, data, steps=3, learning_rate=2e-3)
    return path, data, l1


def test_save_state_returns_a_weights_path(saved):
    path, _, _ = saved
    assert path.startswith("tinker://") and path.endswith("/weights/after-2")


def test_resume_with_optimizer_is_exact(service_client, saved):
    path, data, l1 = saved
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.get_info().lora_rank == 8
    l2 = train_steps(resumed, data, steps=3, learning_rate=2e-3)
    assert l2 == pytest.approx(l1, abs=1e-5)


def test_resume_without_optimizer_has_the_weights_but_fresh_moments(service_client, saved):
    path, data, l1 = saved
    fresh = service_client.create_training_client_from_state(path).result()
    l2 = train_steps(fresh, data, steps=3, learning_rate=2e-3)
    assert l2[0] == pytest.approx(l1[0], abs=1e-5)  # same weights before any step
    assert l2[1] != pytest.approx(l1[1], abs=1e-5)  # Adam restarted from zero moments


def test_load_state_into_an_existing_client(service_client, saved):
    path, data, l1 = saved
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=9).result()
    tc.load_state_with_optimizer(path).result()
    assert train_steps(tc, data, steps=3, learning_rate=2e-3) == pytest.approx(l1, abs=1e-5)


def test_saving_the_same_name_twice_is_refused(service_client, saved):
    path, _, _ = saved
    tc = service_client.create_training_client_from_state(path).result()
    tc.save_state("dup").result()
    with pytest.raises(Exception, match="already exists"):
        tc.save_state("dup").result()
    tc.save_state("dup", overwrite=True).result()
