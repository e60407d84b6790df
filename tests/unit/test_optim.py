"""Per-slot AdamW (actors/trainer/optim.py) against torch.optim.AdamW on the slot's slices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actors.trainer.optim import SlotAdamW
from cluster.messages import AdamParams

NUM_SLOTS, RANK, IN, OUT = 3, 4, 6, 5
SLOT = 1


def _slot_params(seed: int = 0) -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.lora_A": nn.Parameter(torch.randn(NUM_SLOTS, RANK, IN, generator=gen)),
            "layer.lora_B": nn.Parameter(torch.randn(NUM_SLOTS, OUT, RANK, generator=gen))}


def _grads(step: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {"layer.lora_A": scale * torch.randn(RANK, IN, generator=gen),
            "layer.lora_B": scale * torch.randn(OUT, RANK, generator=gen)}


@pytest.mark.parametrize("grad_clip_norm", [0.0, 0.5])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_torch_adamw_step_by_step(grad_clip_norm, foreach):
    adam = AdamParams(learning_rate=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                      grad_clip_norm=grad_clip_norm)
    params = _slot_params()
    untouched = {name: p.detach().clone() for name, p in params.items()}
    ours = SlotAdamW(params, NUM_SLOTS)
    reference = {name: nn.Parameter(p.detach()[SLOT].clone()) for name, p in params.items()}
    torch_adamw = torch.optim.AdamW(list(reference.values()), lr=adam.learning_rate,
                                    betas=(adam.beta1, adam.beta2), eps=adam.eps,
                                    weight_decay=adam.weight_decay, foreach=foreach)
    for step in range(5):
        grads = _grads(step, scale=1.0 + step)  # growing grads so clipping kicks in
        for name, g in grads.items():
            params[name].grad[SLOT] = g
            reference[name].grad = g.clone()
        expected_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()])))
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(list(reference.values()), grad_clip_norm)
        metrics = ours.step(SLOT, adam)
        torch_adamw.step()

        assert metrics["grad_norm:mean"] == pytest.approx(expected_norm, rel=1e-5)
        for name, p in params.items():
            torch.testing.assert_close(p.detach()[SLOT], reference[name].detach(), rtol=1e-6, atol=1e-7)
            assert not p.grad[SLOT].any(), "the step must clear the slot's gradients"
            for other in (0, 2):
                assert torch.equal(p.detach()[other], untouched[name][other])


def test_step_leaves_other_slots_gradients_and_moments_alone():
    params = _slot_params()
    ours = SlotAdamW(params, NUM_SLOTS)
    for p in params.values():
        p.grad.normal_()
    other_grads = {name: p.grad[2].clone() for name, p in params.items()}
    ours.step(SLOT, AdamParams(learning_rate=1e-2))
    for name, p in params.items():
        assert torch.equal(p.grad[2], other_grads[name])
        assert not ours.exp_avg[name][2].any() and not ours.exp_avg_sq[name][2].any()
    assert ours.steps == [0, 1, 0]


def test_state_export_import_continues_identically():
    adam = AdamParams(learning_rate=1e-2, weight_decay=0.05)
    params = _slot_params()
    ours = SlotAdamW(params, NUM_SLOTS)
    for step in range(2):
        for name, g in _grads(step, 1.0).items():
            params[name].grad[SLOT] = g
        ours.step(SLOT, adam)
    state = ours.export_slot_state(SLOT)
    assert int(state["step"]) == 2

    # a second optimizer over a copy of the weights, resumed from the exported state
    copy = {name: nn.Parameter(p.detach().clone()) for name, p in params.items()}
    resumed = SlotAdamW(copy, NUM_SLOTS)
    resumed.load_slot_state(SLOT, state)
    for name, g in _grads(7, 1.0).items():
        params[name].grad[SLOT] = g
        copy[name].grad[SLOT] = g
    ours.step(SLOT, adam)
    resumed.step(SLOT, adam)
    for name in params:
        assert torch.equal(params[name].detach(), copy[name].detach())


def test_reset_slot_forgets_moments_and_step():
    params = _slot_params()
    ours = SlotAdamW(params, NUM_SLOTS)
    for name, g in _grads(0, 1.0).items():
        params[name].grad[SLOT] = g
    ours.step(SLOT, AdamParams())
    ours.reset_slot(SLOT)
    assert ours.steps[SLOT] == 0
    assert all(not m[SLOT].any() for m in ours.exp_avg.values())


@pytest.mark.parametrize("bad", [dict(beta1=1.0), dict(learning_rate=-1.0), dict(grad_clip_norm=-1.0),
                                 dict(weight_decay=-0.1)])
def test_invalid_params_are_rejected_before_anything_changes(bad):
    params = _slot_params()
    before = {name: p.detach().clone() for name, p in params.items()}
    ours = SlotAdamW(params, NUM_SLOTS)
    with pytest.raises(ValueError):
        ours.step(SLOT, AdamParams(**bad))
    assert all(torch.equal(params[n].detach(), before[n]) for n in params)
    assert ours.steps[SLOT] == 0
