"""Tinker's server-side loss functions, selected by the request's `loss_fn` string.

Every loss is computed per token and **sum-reduced** over tokens and datums (Tinker
never normalises; users scale `weights` / `advantages`). A loss function receives:

- `target_logprobs`: logp(target_tokens) under the model, float32, shape `[T]` or
  `[T, K]` (top-k distillation), every datum's tokens back to back, differentiable;
- `inputs`: the other `loss_fn_inputs` as float32 tensors with the same layout;
- `config`: the request's `loss_fn_config` (numbers, or numeric text from the v2 map);

and returns the per-token `elementwise_loss` (same shape as `target_logprobs`) plus
any extra metrics. `compute_loss` adds `loss:sum`, which the SDK requires.

Metric keys are `<name>:<reduction>` with exactly one colon: the SDK combines chunk
results by the reduction suffix and crashes on any other shape of key.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

Inputs = Mapping[str, torch.Tensor]
Config = Mapping[str, float | str]
LossResult = tuple[torch.Tensor, dict[str, float]]
LossFn = Callable[[torch.Tensor, Inputs, Config], LossResult]


def _numeric_config(loss_fn: str, config: Mapping[str, float | str],
                    defaults: Mapping[str, float | None]) -> dict[str, float]:
    """The loss's config with defaults filled in; `None` as a default means required."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        accepted = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"loss_fn_config keys {unknown} are not used by {loss_fn} (accepted: {accepted})")
    values = {}
    for key, default in defaults.items():
        raw = config.get(key, default)
        if raw is None:
            raise ValueError(f"{loss_fn} needs loss_fn_config[{key!r}]")
        try:
            values[key] = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"loss_fn_config[{key!r}] must be a number, got {raw!r}") from None
    return values


def _required_input(loss_fn: str, inputs: Mapping[str, torch.Tensor], name: str,
                    shape: torch.Size) -> torch.Tensor:
    if name not in inputs:
        raise ValueError(f"{loss_fn} needs loss_fn_inputs[{name!r}] (got {sorted(inputs)})")
    value = inputs[name]
    if value.shape != shape:
        raise ValueError(f"loss_fn_inputs[{name!r}] has shape {list(value.shape)}, "
                         f"expected {list(shape)} (the shape of target_tokens)")
    return value


def cross_entropy(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> LossResult:
    """loss = -sum(weights * logp(target)); any real weights, negative included.

    Negative weights matter: the SDK's `forward_backward_custom` sends
    weights = -dC/dlogprob, so the gradient of this sum is the user's own loss gradient.
    """
    _numeric_config("cross_entropy", config, {})
    weights = _required_input("cross_entropy", inputs, "weights", target_logprobs.shape)
    return -weights * target_logprobs, {}


# -- policy-gradient losses: sampler logprobs q (`logprobs`) and `advantages` A ------------


def _policy_inputs(loss_fn: str, inputs: Mapping[str, torch.Tensor],
                   target_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for per_token in ("clip_low_threshold", "clip_high_threshold"):
        if per_token in inputs:  # the SDK can type them as inputs; their semantics are unspecified
            raise ValueError(f"per-token loss_fn_inputs[{per_token!r}] is not supported; "
                             f"pass it in loss_fn_config")
    sampler_logprobs = _required_input(loss_fn, inputs, "logprobs", target_logprobs.shape)
    advantages = _required_input(loss_fn, inputs, "advantages", target_logprobs.shape)
    return sampler_logprobs, advantages


def importance_sampling(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> LossResult:
    """loss = -sum(exp(logp - q) * A): policy gradient corrected for sampler/learner mismatch."""
    _numeric_config("importance_sampling", config, {})
    sampler_logprobs, advantages = _policy_inputs("importance_sampling", inputs, target_logprobs)
    ratio = torch.exp(target_logprobs - sampler_logprobs)
    return -ratio * advantages, {}


def ppo(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> LossResult:
    """loss = -sum(min(r*A, clip(r, low, high)*A)), r = exp(logp - q); absolute ratio bounds."""
    cfg = _numeric_config("ppo", config, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    sampler_logprobs, advantages = _policy_inputs("ppo", inputs, target_logprobs)
    ratio = torch.exp(target_logprobs - sampler_logprobs)
    clipped = ratio.clamp(cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages), {}


def cispo(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> LossResult:
    """loss = -sum(sg(clip(r, low, high)) * A * logp): clipped weights, never a zero gradient."""
    cfg = _numeric_config("cispo", config, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0})
    sampler_logprobs, advantages = _policy_inputs("cispo", inputs, target_logprobs)
    ratio = torch.exp(target_logprobs - sampler_logprobs).detach()
    clipped = ratio.clamp(cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -clipped * advantages * target_logprobs, {}


def dro(target_logprobs: torch.Tensor, inputs: Inputs, config: Config) -> LossResult:
    """loss = -sum(logp*A - beta/2 * (logp - q)^2); beta has no documented default."""
    cfg = _numeric_config("dro", config, {"beta": None})
    sampler_logprobs, advantages = _policy_inputs("dro", inputs, target_logprobs)
    drift = target_logprobs - sampler_logprobs
    return -(target_logprobs * advantages - 0.5 * cfg["beta"] * drift.square()), {}


# Registry: issue 3 adds gspo (sequence-level ratio: needs datum boundaries) here.
LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}


def check_loss_fn(loss_fn: str) -> None:
    if loss_fn not in LOSSES:
        raise ValueError(f"unsupported loss_fn {loss_fn!r}; supported: {', '.join(sorted(LOSSES))}")


def compute_loss(loss_fn: str, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 config: Mapping[str, float | str]) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token loss (sum it for the scalar to backpropagate) and the loss's metrics."""
    check_loss_fn(loss_fn)
    elementwise, extra_metrics = LOSSES[loss_fn](target_logprobs, inputs, config)
    if elementwise.shape != target_logprobs.shape:
        raise RuntimeError(f"{loss_fn} returned shape {list(elementwise.shape)}, "
                           f"expected {list(target_logprobs.shape)}")
    metrics = {"loss:sum": float(elementwise.detach().sum())}
    metrics.update(extra_metrics)
    return elementwise, metrics
