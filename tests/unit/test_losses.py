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


# -- gspo: a sequence-level ratio per datum, a token-level gradient ------------------------

GSPO_DEFAULTS = (1.0 - 3e-4, 1.0 + 4e-4)


def _gspo_case(lengths, seed: int = 5, spread: float = 0.3):
    """Datums shaped like the cookbook's: a prompt (mask 0, A 0) then sampled tokens (mask 1)."""
    rng = np.random.default_rng(seed)
    total = sum(lengths)
    logp = -rng.uniform(0.05, 3.0, total)
    q = logp + rng.normal(0.0, spread, total)
    mask = np.zeros(total)
    advantages = np.zeros(total)
    start = 0
    for n in lengths:
        prompt = n // 3
        mask[start + prompt:start + n] = 1.0
        advantages[start + prompt:start + n] = rng.normal(0.0, 1.0)
        start += n
    return logp, q, advantages, mask


def _gspo_reference(logp, q, advantages, mask, lengths, low, high):
    """Straight from the docstring: per-datum s_i, then per-token values and d/dlogp."""
    loss, grad = np.zeros_like(logp), np.zeros_like(logp)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        m = mask[sl]
        s = np.exp((m * (logp[sl] - q[sl])).sum() / m.sum()) if m.sum() > 0 else 1.0
        unclipped, clipped = s * advantages[sl], np.clip(s, low, high) * advantages[sl]
        loss[sl] = -np.minimum(unclipped, clipped)
        active = (unclipped <= clipped) | (low <= s <= high)
        grad[sl] = np.where(active, -s * advantages[sl], 0.0)
        start += n
    return loss, grad


def _gspo_loss_and_grad(logp, q, advantages, mask, lengths, config):
    target_logprobs = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    inputs = {"logprobs": torch.tensor(q), "advantages": torch.tensor(advantages),
              "sequence_ratio_mask": torch.tensor(mask)}
    elementwise, metrics = compute_loss("gspo", target_logprobs, inputs, config, torch.tensor(lengths))
    elementwise.sum().backward()
    return elementwise.detach().numpy(), target_logprobs.grad.numpy(), metrics


@pytest.mark.parametrize("config, low, high, spread", [
    ({}, *GSPO_DEFAULTS, 1e-3),  # the paper's tight band: sequence ratios straddle it
    ({"clip_low_threshold": 0.8, "clip_high_threshold": "1.2"}, 0.8, 1.2, 0.6),
])
def test_gspo_reference(config, low, high, spread):
    lengths = [9, 4, 12, 7, 6, 10, 5, 8, 3, 11, 6, 4, 9, 7, 5, 8]
    logp, q, adv, mask = _gspo_case(lengths, spread=spread)
    expected_loss, expected_grad = _gspo_reference(logp, q, adv, mask, lengths, low, high)
    loss, grad, metrics = _gspo_loss_and_grad(logp, q, adv, mask, lengths, config)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)
    assert metrics["loss:sum"] == pytest.approx(expected_loss.sum())
    # the case exercises clipped (zero-gradient) and unclipped datums
    assert (grad[adv != 0] == 0).any() and (grad[adv != 0] != 0).any()


def test_gspo_gradient_equals_the_sequence_level_objective():
    """With A constant on the masked tokens and 0 elsewhere, GSPO-token's gradient is that
    of GSPO's sequence objective -|y_i| * min(s_i A_i, clip(s_i) A_i), s_i differentiable."""
    lengths = [10, 6, 9, 12]
    logp, q, adv, mask = _gspo_case(lengths, seed=11, spread=0.2)
    low, high = 0.9, 1.1
    _, grad, _ = _gspo_loss_and_grad(logp, q, adv, mask, lengths,
                                     {"clip_low_threshold": low, "clip_high_threshold": high})
    x = torch.tensor(logp, requires_grad=True)
    total, start = 0.0, 0
    for n in lengths:
        sl = slice(start, start + n)
        m = torch.tensor(mask[sl])
        s = torch.exp((m * (x[sl] - torch.tensor(q[sl]))).sum() / m.sum())
        a = float(adv[sl][mask[sl] > 0][0])
        total = total - m.sum() * torch.minimum(s * a, s.clamp(low, high) * a)
        start += n
    total.backward()
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_gspo_ratio_is_per_datum_and_only_over_masked_tokens():
    logp = np.array([-1.0, -2.0, -0.5, -0.1, -3.0])
    q = np.array([-1.0, -2.1, -0.7, -9.0, -3.0])  # token 3 is masked out: its ratio is huge
    adv = np.ones(5)
    mask = np.array([1.0, 1.0, 1.0, 0.0, 1.0])
    wide = {"clip_low_threshold": 0.0, "clip_high_threshold": 100.0}
    loss, _, _ = _gspo_loss_and_grad(logp, q, adv, mask, [3, 2], wide)
    s0, s1 = np.exp((0.0 + 0.1 + 0.2) / 3), np.exp(0.0)
    np.testing.assert_allclose(loss, -np.array([s0, s0, s0, s1, s1]), rtol=1e-12)
    # one datum instead of two: a single ratio over all masked tokens
    loss_one, _, _ = _gspo_loss_and_grad(logp, q, adv, mask, [5], wide)
    np.testing.assert_allclose(loss_one, -np.full(5, np.exp(0.3 / 4)), rtol=1e-12)
    # lengths default to one datum
    elementwise, _ = compute_loss("gspo", torch.tensor(logp), {
        "logprobs": torch.tensor(q), "advantages": torch.tensor(adv),
        "sequence_ratio_mask": torch.tensor(mask)}, wide)
    np.testing.assert_allclose(elementwise.numpy(), loss_one, rtol=1e-12)


def test_gspo_datum_without_masked_tokens_has_ratio_one():
    loss, grad, _ = _gspo_loss_and_grad(np.array([-1.0, -2.0]), np.array([-5.0, -0.1]),
                                        np.array([2.0, -1.0]), np.zeros(2), [2], {})
    np.testing.assert_allclose(loss, [-2.0, 1.0])
    np.testing.assert_allclose(grad, [-2.0, 1.0])  # s = 1 is inside the clip band


def test_gspo_absurd_ratios_stay_finite():
    loss, grad, _ = _gspo_loss_and_grad(np.array([-1.0, -1.0, -1.0]), np.array([-500.0, -500.0, -1.0]),
                                        np.array([0.0, -1.0, 0.0]), np.array([1.0, 1.0, 0.0]), [3], {})
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert loss[0] == 0.0 and loss[2] == 0.0


@pytest.mark.parametrize("inputs, config, lengths, message", [
    ({"logprobs": 1, "advantages": 1}, {}, None, "needs loss_fn_inputs\\['sequence_ratio_mask'\\]"),
    ({"logprobs": 1, "advantages": 1, "sequence_ratio_mask": -1}, {}, None, "finite values >= 0"),
    ({"logprobs": 1, "advantages": 1, "sequence_ratio_mask": 1},
     {"clip_low_threshold": 1.2, "clip_high_threshold": 0.8}, None, "clip_low_threshold <= "),
    ({"logprobs": 1, "advantages": 1, "sequence_ratio_mask": 1}, {"beta": 0.1}, None, "not used by gspo"),
    ({"logprobs": 1, "advantages": 1, "sequence_ratio_mask": 1}, {}, [1, 2], "do not split"),
])
def test_gspo_rejects_bad_requests(inputs, config, lengths, message):
    with pytest.raises(ValueError, match=message):
        compute_loss("gspo", torch.tensor([-1.0, -2.0]), {k: torch.full((2,), float(v)) for k, v in inputs.items()},
                     config, lengths)


def test_gspo_rejects_top_k_targets():
    with pytest.raises(ValueError, match="shape \\[N\\]"):
        compute_loss("gspo", torch.zeros(3, 2), {k: torch.zeros(3, 2) for k in
                                                 ("logprobs", "advantages", "sequence_ratio_mask")}, {})


def test_gspo_through_the_backend_uses_datum_boundaries(builtin_model_dir):
    """The backend hands compute_loss the batch's lengths: its gradient equals cross_entropy's
    with weights sg(s_i) * A_t, s_i computed per datum from the returned logprobs."""
    from actors.trainer.torch_backend import TorchTrainerBackend
    from cluster.config import ClusterConfig, ModelConfig, TrainerConfig
    from cluster.messages import DatumBatch, LoraSpec

    backend = TorchTrainerBackend(ClusterConfig(model=ModelConfig(path=str(builtin_model_dir), name="tiny"),
                                                trainer=TrainerConfig(max_adapters=1, max_lora_rank=4)))
    backend.create_adapter(1, LoraSpec(rank=4, alpha=8.0, seed=3))
    lengths = [7, 5, 9]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 900, n + 1) for n in lengths]
    tokens = np.concatenate([s[:-1] for s in seqs]).astype(np.int64)
    targets = np.concatenate([s[1:] for s in seqs]).astype(np.int64)
    _, _, adv, mask = _gspo_case(lengths, seed=2)
    base = backend.forward_backward(1, "cross_entropy", {}, True, DatumBatch(
        tokens=tokens, lengths=np.array(lengths), loss_inputs={"target_tokens": targets,
                                                               "weights": np.zeros(len(tokens), np.float32)}))
    q = (base.logprobs + rng.normal(0.0, 0.05, len(tokens))).astype(np.float32)
    wide = {"clip_low_threshold": 0.0, "clip_high_threshold": 100.0}
    result = backend.forward_backward(1, "gspo", wide, False, DatumBatch(
        tokens=tokens, lengths=np.array(lengths), loss_inputs={
            "target_tokens": targets, "logprobs": q, "advantages": adv.astype(np.float32),
            "sequence_ratio_mask": mask.astype(np.float32)}))
    gspo_grads = {n: p.grad.clone() for n, p in backend.optimizer.params.items()}
    expected_loss, expected_grad = _gspo_reference(result.logprobs.astype(np.float64), q.astype(np.float64),
                                                   adv, mask, lengths, 0.0, 100.0)
    np.testing.assert_allclose(result.elementwise_loss, expected_loss, rtol=1e-5, atol=1e-6)
    backend.optimizer.zero_grad(1)
    backend.forward_backward(1, "cross_entropy", {}, False, DatumBatch(
        tokens=tokens, lengths=np.array(lengths), loss_inputs={
            "target_tokens": targets, "weights": (-expected_grad).astype(np.float32)}))
    for n, p in backend.optimizer.params.items():
        torch.testing.assert_close(gspo_grads[n], p.grad, rtol=1e-4, atol=1e-7)


# -- stable_reinforce: tinkerd's objective against a per-token reference written from its definition --

def _stable_reinforce_case(seed: int = 5, tokens: int = 96):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, tokens)
    q = logp + rng.normal(0.0, 1.2, tokens)  # ratios below 1/M, between C and M, and above M
    advantages = rng.normal(0.0, 1.0, tokens)
    sampled = rng.uniform(size=tokens) < 0.8
    advantages[~sampled] = 0.0  # what the controller enforces on prompt tokens
    return logp, q, advantages, sampled


def _stable_reinforce_reference(logp, q, adv, sampled, cap, bound, kl_coeff):
    """loss_t and dloss_t/dlogp_t one token at a time, straight from the definition."""
    losses, grads = [], []
    for lp, lq, a, s in zip(logp, q, adv, sampled):
        r = np.exp(lp - lq)
        if not s or r < 1 / bound or r > bound:
            losses.append(0.0)
            grads.append(0.0)
            continue
        w = min(r, cap)
        losses.append(-w * a * lp + kl_coeff * (r - 1 - np.log(r)))
        grads.append(-w * a + kl_coeff * (r - 1))  # d(r - 1 - log r)/dlogp = r - 1
    return np.array(losses), np.array(grads)


def _stable_reinforce(logp, q, adv, sampled, config):
    target_logprobs = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    inputs = {"logprobs": torch.tensor(q), "advantages": torch.tensor(adv),
              "sampled_mask": torch.tensor(sampled, dtype=torch.float64)}
    elementwise, metrics = compute_loss("stable_reinforce", target_logprobs, inputs, config)
    elementwise.sum().backward()
    return elementwise.detach().numpy(), target_logprobs.grad.numpy(), metrics


@pytest.mark.parametrize("config, cap, bound, kl_coeff", [
    ({}, 2.0, 5.0, 0.0),
    ({"ratio_cap": 1.5, "ratio_mask": "3", "kl_coeff": 0.1}, 1.5, 3.0, 0.1),
    ({"ratio_cap": float("inf"), "ratio_mask": float("inf"), "kl_coeff": 0.05}, np.inf, np.inf, 0.05),
])
def test_stable_reinforce_reference(config, cap, bound, kl_coeff):
    logp, q, adv, sampled = _stable_reinforce_case()
    expected_loss, expected_grad = _stable_reinforce_reference(logp, q, adv, sampled, cap, bound, kl_coeff)
    loss, grad, metrics = _stable_reinforce(logp, q, adv, sampled, config)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)
    ratio = np.exp(logp - q)[sampled]
    dropped = (ratio < 1 / bound) | (ratio > bound)
    assert metrics["masked_frac:mean"] == pytest.approx(dropped.mean())
    assert metrics["ratio:mean"] == pytest.approx(ratio.mean())
    kept = ratio[~dropped]
    assert metrics["kl:mean"] == pytest.approx((kept - 1 - np.log(kept)).mean())
    assert metrics["loss:sum"] == pytest.approx(expected_loss.sum())
    if np.isfinite(bound):  # the case exercises every branch: dropped, truncated, plain
        assert dropped.any() and ((ratio > cap) & ~dropped).any() and (ratio < cap).any()


def test_stable_reinforce_on_policy_is_reinforce():
    logp, _, adv, sampled = _stable_reinforce_case()
    loss, grad, metrics = _stable_reinforce(logp, logp, adv, sampled, {"kl_coeff": 1.0})
    np.testing.assert_allclose(grad, np.where(sampled, -adv, 0.0), rtol=1e-12, atol=1e-15)
    assert (metrics["masked_frac:mean"], metrics["ratio:mean"], metrics["kl:mean"]) == (0.0, 1.0, 0.0)


def test_stable_reinforce_absurd_ratios_stay_finite():
    logp, q, adv, sampled = _stable_reinforce_case()
    q[:10] = -1000.0
    loss, grad, metrics = _stable_reinforce(logp, q, adv, sampled, {"ratio_mask": 5.0, "kl_coeff": 0.5})
    assert np.isfinite(loss).all() and np.isfinite(grad).all() and np.isfinite(list(metrics.values())).all()
    assert (loss[:10] == 0).all() and (grad[:10] == 0).all()  # dropped by the mask


@pytest.mark.parametrize("inputs, config, message", [
    ({"sampled_mask": None}, {}, "sampled_mask"),
    ({}, {"ratio_cap": 0.0}, "ratio_cap > 0"),
    ({}, {"ratio_mask": 0.5}, "ratio_mask >= 1"),
    ({}, {"kl_coeff": -1.0}, "kl_coeff"),
    ({}, {"clip_low_threshold": 0.8}, "not used by stable_reinforce"),
])
def test_stable_reinforce_rejects_bad_requests(inputs, config, message):
    full = {"logprobs": torch.zeros(3), "advantages": torch.ones(3), "sampled_mask": torch.ones(3)}
    full.update(inputs)
    with pytest.raises(ValueError, match=message):
        compute_loss("stable_reinforce", torch.zeros(3), {k: v for k, v in full.items() if v is not None}, config)


def test_stable_reinforce_rejects_top_k_targets():
    inputs = {name: torch.zeros(3, 2) for name in ("logprobs", "advantages", "sampled_mask")}
    with pytest.raises(ValueError, match="shape \\[N\\]"):
        compute_loss("stable_reinforce", torch.zeros(3, 2), inputs, {})
