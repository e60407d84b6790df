"""Tinker losses against direct reference formulas (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actors.trainer.losses import LOSSES, compute_loss


def _logits(tokens: int, vocab: int = 11, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, vocab, generator=gen, dtype=torch.float32).requires_grad_(True)


def test_cross_entropy_matches_torch_cross_entropy_with_signed_weights():
    logits = _logits(7)
    targets = torch.tensor([3, 0, 10, 5, 5, 1, 2])
    weights = torch.tensor([1.0, 0.0, -2.5, 0.5, 1.0, -1.0, 3.0])  # negative: forward_backward_custom
    target_logprobs = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    elementwise, metrics = compute_loss("cross_entropy", target_logprobs, {"weights": weights}, {})
    elementwise.sum().backward()
    ours_grad = logits.grad.clone()

    logits.grad = None
    reference = (weights * F.cross_entropy(logits, targets, reduction="none"))
    reference.sum().backward()

    torch.testing.assert_close(elementwise, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-6, atol=1e-6)
    assert metrics["loss:sum"] == pytest.approx(float(reference.detach().sum()), rel=1e-6)


def test_cross_entropy_top_k_targets_hand_formula():
    tokens, k = 5, 3
    logits = _logits(tokens, seed=1)
    gen = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 11, (tokens, k), generator=gen)
    weights = torch.randn(tokens, k, generator=gen)
    logp = logits.log_softmax(-1)
    target_logprobs = logp.gather(1, targets)

    elementwise, metrics = compute_loss("cross_entropy", target_logprobs, {"weights": weights}, {})
    assert elementwise.shape == (tokens, k)
    elementwise.sum().backward()
    ours_grad = logits.grad.clone()

    logits.grad = None
    reference = torch.zeros(tokens, k)
    for t in range(tokens):
        for j in range(k):
            reference[t, j] = -weights[t, j] * torch.log_softmax(logits[t], -1)[targets[t, j]]
    reference.sum().backward()

    torch.testing.assert_close(elementwise, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-6, atol=1e-6)
    assert metrics["loss:sum"] == pytest.approx(float(reference.detach().sum()), rel=1e-5)


def test_cross_entropy_gradient_wrt_logprobs_is_minus_weights():
    # the custom-loss contract: weights = -dC/dlogprob reproduces dC/dlogprob exactly
    target_logprobs = torch.tensor([-0.5, -2.0, -0.1], requires_grad=True)
    weights = torch.tensor([0.25, -4.0, 1.5])
    elementwise, _ = compute_loss("cross_entropy", target_logprobs, {"weights": weights}, {})
    elementwise.sum().backward()
    torch.testing.assert_close(target_logprobs.grad, -weights)


def test_empty_inputs_give_zero_loss():
    elementwise, metrics = compute_loss("cross_entropy", torch.zeros(0), {"weights": torch.zeros(0)}, {})
    assert elementwise.shape == (0,)
    assert metrics == {"loss:sum": 0.0}


def test_metric_keys_have_exactly_one_colon():
    _, metrics = compute_loss("cross_entropy", torch.tensor([-1.0]), {"weights": torch.tensor([1.0])}, {})
    assert metrics and all(key.count(":") == 1 for key in metrics)


def test_unknown_loss_names_the_supported_ones():
    with pytest.raises(ValueError, match="cross_entropy"):
        compute_loss("reinforce_plus_plus", torch.tensor([-1.0]), {}, {})
    assert "cross_entropy" in LOSSES


@pytest.mark.parametrize("inputs, config, message", [
    ({}, {}, "needs loss_fn_inputs\\['weights'\\]"),
    ({"weights": torch.ones(3)}, {}, "shape"),
    ({"weights": torch.ones(2)}, {"beta": 0.1}, "not used by cross_entropy"),
])
def test_cross_entropy_rejects_bad_inputs(inputs, config, message):
    with pytest.raises(ValueError, match=message):
        compute_loss("cross_entropy", torch.tensor([-1.0, -2.0]), inputs, config)


# -- policy-gradient losses: values vs numpy formulas, gradients vs hand-derived d/dlogp ----

def _policy_case(seed: int = 3, tokens: int = 64):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, tokens)
    q = logp + rng.normal(0.0, 0.4, tokens)  # ratios spread over and beyond the clip range
    advantages = rng.normal(0.0, 1.0, tokens)
    return logp, q, advantages


def _loss_and_grad(loss_fn, logp, q, advantages, config):
    target_logprobs = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    inputs = {"logprobs": torch.tensor(q), "advantages": torch.tensor(advantages)}
    elementwise, metrics = compute_loss(loss_fn, target_logprobs, inputs, config)
    elementwise.sum().backward()
    return elementwise.detach().numpy(), target_logprobs.grad.numpy(), metrics


def test_importance_sampling_reference():
    logp, q, adv = _policy_case()
    ratio = np.exp(logp - q)
    loss, grad, metrics = _loss_and_grad("importance_sampling", logp, q, adv, {})
    np.testing.assert_allclose(loss, -ratio * adv, rtol=1e-12)
    np.testing.assert_allclose(grad, -ratio * adv, rtol=1e-12)  # d exp(logp - q)/dlogp = ratio
    assert metrics["loss:sum"] == pytest.approx((-ratio * adv).sum())


@pytest.mark.parametrize("config, low, high", [
    ({}, 0.8, 1.2),
    ({"clip_low_threshold": "0.5", "clip_high_threshold": 2.0}, 0.5, 2.0),  # text values: config v2
])
def test_ppo_reference(config, low, high):
    logp, q, adv = _policy_case()
    ratio = np.exp(logp - q)
    unclipped, clipped = ratio * adv, np.clip(ratio, low, high) * adv
    loss, grad, _ = _loss_and_grad("ppo", logp, q, adv, config)
    np.testing.assert_allclose(loss, -np.minimum(unclipped, clipped), rtol=1e-12)
    # the gradient flows only where the unclipped term is the minimum and r is inside the clip range
    active = (unclipped <= clipped) | ((ratio >= low) & (ratio <= high))
    np.testing.assert_allclose(grad, np.where(active, -ratio * adv, 0.0), rtol=1e-12, atol=1e-15)
    assert (~active).any() and active.any()  # the case exercises both branches


@pytest.mark.parametrize("config, low, high", [
    ({}, 0.0, 4.0),
    ({"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, 0.9, 1.1),
])
def test_cispo_reference(config, low, high):
    logp, q, adv = _policy_case()
    weight = np.clip(np.exp(logp - q), low, high)
    loss, grad, _ = _loss_and_grad("cispo", logp, q, adv, config)
    np.testing.assert_allclose(loss, -weight * adv * logp, rtol=1e-12)
    np.testing.assert_allclose(grad, -weight * adv, rtol=1e-12)  # the clipped ratio is a constant


def test_dro_reference():
    logp, q, adv = _policy_case()
    beta = 0.05
    loss, grad, _ = _loss_and_grad("dro", logp, q, adv, {"beta": beta})
    np.testing.assert_allclose(loss, -(logp * adv - 0.5 * beta * (logp - q) ** 2), rtol=1e-12)
    np.testing.assert_allclose(grad, -(adv - beta * (logp - q)), rtol=1e-12)


@pytest.mark.parametrize("loss_fn, inputs, config, message", [
    ("dro", {"logprobs": 1, "advantages": 1}, {}, "needs loss_fn_config\\['beta'\\]"),
    ("ppo", {"logprobs": 1}, {}, "needs loss_fn_inputs\\['advantages'\\]"),
    ("ppo", {"logprobs": 1, "advantages": 1}, {"clip_low_threshold": "wide"}, "must be a number"),
    ("cispo", {"logprobs": 1, "advantages": 1, "clip_low_threshold": 1}, {}, "per-token"),
    ("importance_sampling", {"logprobs": 1, "advantages": 1}, {"beta": 0.1}, "not used by importance_sampling"),
])
def test_policy_losses_reject_bad_requests(loss_fn, inputs, config, message):
    with pytest.raises(ValueError, match=message):
        compute_loss(loss_fn, torch.tensor([-1.0, -2.0]), {k: torch.zeros(2) for k in inputs}, config)
