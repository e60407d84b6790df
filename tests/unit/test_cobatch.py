"""One clock cycle's pass holding several models (actors/trainer/cobatch.py), on the torch backend.

Three adapters of different ranks train with different losses (cross_entropy, ppo,
importance_sampling) on datums of different lengths. Run in one pass, each must get what
it gets alone: the same logprobs and losses (1e-5 relative, fp32), the same gradients (fp32
summation noise, tests/numerics.py), and an idle slot's gradients and Adam state stay
exactly as they were. A pass cut into microbatches equals the whole pass, and a refused
entry leaves its slot alone while the others run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from actors.lora import MultiLoraLinear
from actors.trainer.checkpoint_files import MOMENTS
from actors.trainer.torch_backend import TorchTrainerBackend
from cluster.config import ClusterConfig, ModelConfig, TrainerConfig
from cluster.messages import AdamParams, DatumBatch, LoraSpec, PassEntry, SlotStep
from tests.numerics import assert_close_at_scale

TENANT_SETS = {  # slot -> (spec, loss, datum lengths)
    # ranks and row counts differ: each slot's block of rows runs by itself (actors/lora.py)
    "mixed": {
        1: (LoraSpec(rank=2, alpha=8.0, seed=11), "cross_entropy", [5, 17, 3]),
        2: (LoraSpec(rank=8, alpha=16.0, seed=12, train_unembed=False), "ppo", [9, 4]),
        3: (LoraSpec(rank=4, alpha=4.0, seed=13, train_mlp=False), "importance_sampling", [12, 6, 8, 2]),
    },
    # one rank and as many rows each: the blocks run as one batched matmul, except in the MLP layers slot 2 leaves
    "alike": {
        1: (LoraSpec(rank=4, alpha=8.0, seed=21), "cross_entropy", [5, 9]),
        2: (LoraSpec(rank=4, alpha=16.0, seed=22, train_mlp=False), "ppo", [7, 3]),
        3: (LoraSpec(rank=4, alpha=4.0, seed=23), "importance_sampling", [4, 4]),
    },
}
IDLE = 4
ADAM = AdamParams(learning_rate=1e-2)


def _batch(loss_fn: str, lengths: list[int], seed: int) -> DatumBatch:
    rng = np.random.default_rng(seed)
    total = sum(lengths)
    inputs = {"target_tokens": rng.integers(0, 900, total)}
    if loss_fn == "cross_entropy":
        inputs["weights"] = rng.uniform(-1.0, 2.0, total).astype(np.float32)
    else:
        inputs["logprobs"] = rng.uniform(-8.0, -0.5, total).astype(np.float32)
        inputs["advantages"] = rng.normal(size=total).astype(np.float32)
    return DatumBatch(tokens=rng.integers(0, 900, total), lengths=np.array(lengths, dtype=np.int64),
                      loss_inputs=inputs)


def _entries(tenants: dict, forward_only: bool = False) -> list[PassEntry]:
    return [PassEntry(slot=slot, loss_fn=loss, forward_only=forward_only, batch=_batch(loss, lengths, seed=slot))
            for slot, (_, loss, lengths) in tenants.items()]


@pytest.fixture(scope="module", params=list(TENANT_SETS))
def tenants(request) -> dict:
    return TENANT_SETS[request.param]


@pytest.fixture(scope="module")
def trained(builtin_model_dir, tenants) -> TorchTrainerBackend:
    """Every tenant's adapter after one optim step (so B != 0 and every slot changes the outputs), plus an idle
    slot with Adam state of its own."""
    config = ClusterConfig(model=ModelConfig(path=str(builtin_model_dir), name="tiny"),
                           trainer=TrainerConfig(max_adapters=4, max_lora_rank=8))
    backend = TorchTrainerBackend(config)
    for slot, (spec, _, _) in [*tenants.items(), (IDLE, (LoraSpec(rank=4, seed=14), None, None))]:
        backend.create_adapter(slot, spec)
    backend.forward_backward_many([*_entries(tenants), PassEntry(slot=IDLE, loss_fn="cross_entropy",
                                                          batch=_batch("cross_entropy", [7], seed=9))])
    backend.optim_steps([SlotStep(slot=slot, adam=ADAM) for slot in [*tenants, IDLE]])
    return backend


@pytest.fixture
def backend(trained) -> TorchTrainerBackend:
    return copy.deepcopy(trained)


def _grads(backend: TorchTrainerBackend, slot: int) -> dict[str, torch.Tensor]:
    # a deep copy's parameters start without .grad: that is zero gradients
    return {name: torch.zeros_like(param[slot]) if param.grad is None else param.grad[slot].clone()
            for name, param in backend.optimizer.params.items()}


def _alone(backend: TorchTrainerBackend, tenants: dict) -> dict[int, tuple]:
    """Each tenant's pass by itself on a copy: (result, its slot's gradients)."""
    out = {}
    for entry in _entries(tenants):
        solo = copy.deepcopy(backend)
        (result,) = solo.forward_backward_many([entry])
        out[entry.slot] = (result, _grads(solo, entry.slot))
    return out


def _assert_same_result(shared, alone) -> None:
    np.testing.assert_array_equal(shared.lengths, alone.lengths)
    np.testing.assert_allclose(shared.logprobs, alone.logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shared.elementwise_loss, alone.elementwise_loss, rtol=1e-5, atol=1e-6)
    assert shared.metrics.keys() == alone.metrics.keys()
    for key, value in alone.metrics.items():
        assert shared.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_shared_pass_gives_each_model_what_it_gets_alone(backend, tenants, monkeypatch):
    expected = _alone(backend, tenants)
    idle_grads = _grads(backend, IDLE)
    idle_moments = {m: {n: t[IDLE].clone() for n, t in getattr(backend.optimizer, m).items()} for m in MOMENTS}
    batched_layers = []
    batched = MultiLoraLinear._add_batched_segment_terms
    monkeypatch.setattr(MultiLoraLinear, "_add_batched_segment_terms",
                        lambda self, *args: batched_layers.append(batched(self, *args)) or batched_layers[-1])

    results = backend.forward_backward_many(_entries(tenants))

    took_batched = any(delta is not None for delta in batched_layers)
    assert took_batched == (tenants is TENANT_SETS["alike"])

    for entry, result in zip(_entries(tenants), results):
        alone, alone_grads = expected[entry.slot]
        _assert_same_result(result, alone)
        for name, grad in _grads(backend, entry.slot).items():
            assert_close_at_scale(grad, alone_grads[name], msg=f"slot {entry.slot} {name}")
    for name, grad in _grads(backend, IDLE).items():
        torch.testing.assert_close(grad, idle_grads[name], rtol=0, atol=0)  # bit for bit: never touched
    metrics = backend.optim_steps([SlotStep(slot=slot, adam=ADAM) for slot in tenants])
    assert all(m["grad_norm:mean"] > 0 for m in metrics)
    for moment, before in idle_moments.items():
        for name, value in before.items():
            torch.testing.assert_close(getattr(backend.optimizer, moment)[name][IDLE], value, rtol=0, atol=0)


def test_microbatches_add_up_to_the_whole_pass(backend, tenants):
    whole = copy.deepcopy(backend)
    expected = whole.forward_backward_many(_entries(tenants))
    backend.config.trainer.max_tokens_per_pass = 40  # 9 rows x 17 wide would be 153: several microbatches
    results = backend.forward_backward_many(_entries(tenants))
    for result, alone in zip(results, expected):
        _assert_same_result(result, alone)
    for slot in tenants:
        for name, grad in _grads(backend, slot).items():
            assert_close_at_scale(grad, _grads(whole, slot)[name], msg=f"slot {slot} {name}")


def test_forward_only_entries_share_a_pass_with_training_ones(backend, tenants):
    before = {slot: _grads(backend, slot) for slot in tenants}
    mixed = _entries(tenants)
    mixed[1] = PassEntry(slot=mixed[1].slot, loss_fn=mixed[1].loss_fn, forward_only=True, batch=mixed[1].batch)
    expected = _alone(backend, tenants)
    results = backend.forward_backward_many(mixed)
    _assert_same_result(results[1], expected[2][0])
    for name, grad in _grads(backend, 2).items():  # the forward-only model accumulated nothing
        torch.testing.assert_close(grad, before[2][name], rtol=0, atol=0)
    for name, grad in _grads(backend, 1).items():
        assert_close_at_scale(grad, expected[1][1][name], msg=name)


def test_a_refused_entry_changes_nothing_and_the_others_run(backend, tenants):
    entries = _entries(tenants)
    bad = entries[0].batch
    entries[0] = PassEntry(slot=1, loss_fn="cross_entropy", batch=DatumBatch(
        tokens=np.full_like(bad.tokens, 5000), lengths=bad.lengths, loss_inputs=bad.loss_inputs))
    before = _grads(backend, 1)
    expected = _alone(backend, tenants)
    outcomes = backend.forward_backward_many(entries)
    assert isinstance(outcomes[0], ValueError) and "token ids" in str(outcomes[0])
    for name, grad in _grads(backend, 1).items():
        torch.testing.assert_close(grad, before[name], rtol=0, atol=0)
    _assert_same_result(outcomes[1], expected[2][0])
    _assert_same_result(outcomes[2], expected[3][0])
    steps = backend.optim_steps([SlotStep(slot=2, adam=ADAM), SlotStep(slot=2, adam=AdamParams(learning_rate=-1.0))])
    assert isinstance(steps[1], ValueError) and steps[0]["grad_norm:mean"] > 0
