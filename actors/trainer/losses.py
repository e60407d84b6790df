"""Tinker's server-side loss functions, selected by the request's `loss_fn` string.

Every loss is computed per token and **sum-reduced** over tokens and datums (Tinker
never normalises; users scale `weights` / `advantages`). A loss function receives:

- `target_logprobs`: logp(target_tokens) under the model, float32, shape `[T]` or
  `[T, K]` (top-k distillation), every datum's tokens back to back, differentiable;
- `inputs`: the other `loss_fn_inputs` as float32 tensors with the same layout;
- `config`: the request's `loss_fn_config` (numbers, or numeric text from the v2 map);
- `lengths`: int64 `[B]`, how many of those tokens each datum owns, in order (datum
  boundaries; only sequence-level losses such as gspo use them);

and returns the per-token `elementwise_loss` (same shape as `target_logprobs`) plus
any extra metrics. `compute_loss` adds `loss:sum`, which the SDK requires.

Metric keys are `<name>:<reduction>` with exactly one colon: the SDK combines chunk
results by the reduction suffix and crashes on any other shape of key.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

Inputs = Mapping[str, torch.Tensor]
Config = Mapping[str, float | str]
LossResult = tuple[torch.Tensor, dict[str, float]]
LossFn = Callable[[torch.Tensor, Inputs, Config, torch.Tensor], LossResult]


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


def cross_entropy(target_logprobs: torch.Tensor, inputs: Inputs, config: Config,
                  lengths: torch.Tensor | None = None) -> LossResult:
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


def importance_sampling(target_logprobs: torch.Tensor, inputs: Inputs, config: Config,
                        lengths: torch.Tensor | None = None) -> LossResult:
    """loss = -sum(exp(logp - q) * A): policy gradient corrected for sampler/learner mismatch."""
    _numeric_config("importance_sampling", config, {})
    sampler_logprobs, advantages = _policy_inputs("importance_sampling", inputs, target_logprobs)
    ratio = torch.exp(target_logprobs - sampler_logprobs)
    return -ratio * advantages, {}


def ppo(target_logprobs: torch.Tensor, inputs: Inputs, config: Config,
        lengths: torch.Tensor | None = None) -> LossResult:
    """loss = -sum(min(r*A, clip(r, low, high)*A)), r = exp(logp - q); absolute ratio bounds."""
    cfg = _numeric_config("ppo", config, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    sampler_logprobs, advantages = _policy_inputs("ppo", inputs, target_logprobs)
    ratio = torch.exp(target_logprobs - sampler_logprobs)
    clipped = ratio.clamp(cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages), {}


def cispo(target_logprobs: torch.Tensor, inputs: Inputs, config: Config,
          lengths: torch.Tensor | None = None) -> LossResult:
    """loss = -sum(sg(clip(r, low, high)) * A * logp): clipped weights, never a zero gradient."""
    cfg = _numeric_config("cispo", config, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0})
    sampler_logprobs, advantages = _policy_inputs("cispo", inputs, target_logprobs)
    ratio = torch.exp(target_logprobs - sampler_logprobs).detach()
    clipped = ratio.clamp(cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -clipped * advantages * target_logprobs, {}


def dro(target_logprobs: torch.Tensor, inputs: Inputs, config: Config,
        lengths: torch.Tensor | None = None) -> LossResult:
    """loss = -sum(logp*A - beta/2 * (logp - q)^2); beta has no documented default."""
    cfg = _numeric_config("dro", config, {"beta": None})
    sampler_logprobs, advantages = _policy_inputs("dro", inputs, target_logprobs)
    drift = target_logprobs - sampler_logprobs
    return -(target_logprobs * advantages - 0.5 * cfg["beta"] * drift.square()), {}


# GSPO paper (Zheng et al. 2025, arXiv:2507.18071 v2, sec. 5.1): eps_low = 3e-4,
# eps_high = 4e-4 around a ratio of 1, written as absolute bounds like ppo's thresholds.
GSPO_CLIP_LOW = 1.0 - 3e-4
GSPO_CLIP_HIGH = 1.0 + 4e-4
GSPO_MAX_LOG_RATIO = 20.0


def gspo(target_logprobs: torch.Tensor, inputs: Inputs, config: Config,
         lengths: torch.Tensor | None = None) -> LossResult:
    """GSPO-token: a sequence-level importance ratio with a token-level gradient.

    For datum i with tokens t, model logprobs logp_t, sampler logprobs q_t, advantages
    A_t and `sequence_ratio_mask` m_t (>= 0; which tokens count toward the ratio):

        s_i     = exp( sum_t m_t (logp_t - q_t) / sum_t m_t )   (1 when sum_t m_t = 0)
        s_{i,t} = sg(s_i) * exp(logp_t - sg(logp_t))            (value s_i, d/dlogp_t = s_i)
        loss_t  = -min( s_{i,t} A_t, clip(s_{i,t}, low, high) A_t )

    sg = stop-gradient; low/high = `clip_low_threshold` / `clip_high_threshold`,
    absolute bounds on the ratio like ppo's, defaulting to the GSPO paper's
    1 - 3e-4 and 1 + 4e-4. So the clip decision is made per sequence (every token of a
    datum shares s_i) and an unclipped token's gradient is -s_i * A_t * dlogp_t: with
    A_t = A_i on the masked tokens this is exactly the gradient of the paper's GSPO
    (and GSPO-token) objective without its 1/|y_i| factor, since Tinker losses are sums over
    tokens, never means (scale `advantages` for the paper's normalisation). The mask
    only shapes s_i; the loss covers every token, weighted by its advantage (the
    cookbook sends A_t = 0 and m_t = 0 on prompt tokens). Targets must be `[N]`.
    log s_i is capped at GSPO_MAX_LOG_RATIO (20) so absurd inputs stay finite.
    """
    cfg = _numeric_config("gspo", config, {"clip_low_threshold": GSPO_CLIP_LOW,
                                           "clip_high_threshold": GSPO_CLIP_HIGH})
    low, high = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    if not low <= high:
        raise ValueError(f"gspo needs clip_low_threshold <= clip_high_threshold, got {low} > {high}")
    if target_logprobs.dim() != 1:
        raise ValueError(f"gspo needs target_tokens of shape [N] (one target per position), got "
                         f"{list(target_logprobs.shape)}")
    sampler_logprobs, advantages = _policy_inputs("gspo", inputs, target_logprobs)
    mask = _required_input("gspo", inputs, "sequence_ratio_mask", target_logprobs.shape)
    if bool((mask < 0).any()) or not bool(torch.isfinite(mask).all()):
        raise ValueError("loss_fn_inputs['sequence_ratio_mask'] must hold finite values >= 0 "
                         "(1 = the token counts toward its sequence's ratio, 0 = it does not)")
    lengths = _datum_lengths(target_logprobs, lengths)
    datum = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    log_ratio = (target_logprobs - sampler_logprobs).detach()
    weight = torch.zeros(len(lengths), dtype=log_ratio.dtype, device=log_ratio.device)
    weight.index_add_(0, datum, mask.to(log_ratio.dtype))
    total = torch.zeros_like(weight).index_add_(0, datum, mask.to(log_ratio.dtype) * log_ratio)
    seq_log_ratio = torch.where(weight > 0, total / weight.clamp_min(torch.finfo(weight.dtype).tiny),
                                torch.zeros_like(total))
    # capped so that absurd inputs (e.g. placeholder sampler logprobs) give a finite loss
    # instead of inf * 0 = NaN on zero-advantage tokens; exp(20) ~ 5e8 is far past any clip
    seq_ratio = torch.exp(seq_log_ratio.clamp(max=GSPO_MAX_LOG_RATIO))[datum]  # s_i at datum i's tokens
    ratio = seq_ratio * torch.exp(target_logprobs - target_logprobs.detach())
    clipped = ratio.clamp(low, high)
    return -torch.minimum(ratio * advantages, clipped * advantages), {}


# tinkerd's stable_reinforce (Thinking Machines' own objective is unpublished): a truncated
# importance weight, cap C (TIS: Yao et al. 2025, "Your efficient RL framework secretly
# brings you off-policy RL training"), and an IcePop mask (Ring-1T report, 2025) on the
# ratio range [1/M, M]; M = 5 keeps [0.2, 5], the range prime-rl's IcePop loss uses.
STABLE_REINFORCE_DEFAULTS = {"ratio_cap": 2.0, "ratio_mask": 5.0, "kl_coeff": 0.0}


def stable_reinforce(target_logprobs: torch.Tensor, inputs: Inputs, config: Config,
                     lengths: torch.Tensor | None = None) -> LossResult:
    """Off-policy-robust REINFORCE against the sampler logprobs the server recorded itself.

    On the tokens a recorded sequence sampled (`sampled_mask` 1; the controller fills it and
    `logprobs` q from its own records, never from the client), with r_t = exp(logp_t - q_t):

        keep_t = 1 if 1/M <= r_t <= M else 0      (IcePop: drop, don't clip, outlier tokens)
        w_t    = sg(min(r_t, C))                  (truncated importance weight, TIS)
        kl_t   = r_t - 1 - log r_t                (k3 estimate of KL(sampler || policy) on tokens
                                                   the sampler drew; gradient (r_t - 1) dlogp_t)
        loss_t = keep_t * (-w_t * A_t * logp_t + kl_coeff * kl_t)

    and loss_t = 0 on every other token. C = `ratio_cap` (default 2; inf = no truncation),
    M = `ratio_mask` (default 5, >= 1; inf = no masking), `kl_coeff` (default 0); log r is
    capped at GSPO_MAX_LOG_RATIO (20) so that absurd inputs stay finite. Metrics:
    `masked_frac:mean` (share of sampled tokens dropped), `ratio:mean` (mean r over sampled
    tokens), `kl:mean` (mean kl_t over the kept ones). Targets must be `[N]`.
    """
    cfg = _numeric_config("stable_reinforce", config, STABLE_REINFORCE_DEFAULTS)
    cap, bound, kl_coeff = cfg["ratio_cap"], cfg["ratio_mask"], cfg["kl_coeff"]
    if not (cap > 0 and bound >= 1 and 0 <= kl_coeff < float("inf")):
        raise ValueError(f"stable_reinforce needs ratio_cap > 0, ratio_mask >= 1 and a finite kl_coeff >= 0; "
                         f"got {cap}, {bound}, {kl_coeff}")
    if target_logprobs.dim() != 1:
        raise ValueError(f"stable_reinforce needs target_tokens of shape [N], got {list(target_logprobs.shape)}")
    sampler_logprobs, advantages = _policy_inputs("stable_reinforce", inputs, target_logprobs)
    sampled = _required_input("stable_reinforce", inputs, "sampled_mask", target_logprobs.shape) > 0
    log_ratio = (target_logprobs - sampler_logprobs).masked_fill(~sampled, 0.0)
    kept = sampled & (log_ratio.detach().abs() <= math.log(bound))
    # capped (as gspo's) so that a dropped token's absurd ratio cannot overflow exp and turn its
    # zero gradient into inf * 0 = NaN; kept tokens lie within log M of 0, below the cap for any M < e^20
    ratio = torch.exp(log_ratio.clamp(-GSPO_MAX_LOG_RATIO, GSPO_MAX_LOG_RATIO))
    weight = ratio.detach().clamp(max=cap)
    kl = ratio - 1 - torch.log(ratio)
    loss = torch.where(kept, -weight * advantages * target_logprobs + kl_coeff * kl,
                       torch.zeros_like(target_logprobs))
    n_sampled = int(sampled.sum())
    metrics = {"masked_frac:mean": float((sampled & ~kept).sum()) / n_sampled if n_sampled else 0.0,
               "ratio:mean": float(ratio.detach()[sampled].mean()) if n_sampled else 0.0,
               "kl:mean": float(kl.detach()[kept].mean()) if bool(kept.any()) else 0.0}
    return loss, metrics


def _datum_lengths(target_logprobs: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Datum boundaries as an int64 tensor on the logprobs' device; None = one datum."""
    total = int(target_logprobs.shape[0])
    if lengths is None:
        lengths = [total] if total else []
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.tensor([int(n) for n in lengths], dtype=torch.int64)
    lengths = lengths.to(device=target_logprobs.device, dtype=torch.int64)
    if lengths.dim() != 1 or bool((lengths < 0).any()) or int(lengths.sum()) != total:
        raise ValueError(f"datum lengths {lengths.tolist()} do not split the batch's {total} tokens")
    return lengths


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
}


def check_loss_fn(loss_fn: str) -> None:
    if loss_fn not in LOSSES:
        raise ValueError(f"unsupported loss_fn {loss_fn!r}; supported: {', '.join(sorted(LOSSES))}")


def compute_loss(loss_fn: str, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 config: Mapping[str, float | str], lengths: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token loss (sum it for the scalar to backpropagate) and the loss's metrics.

    `lengths` are the datum boundaries (tokens per datum, in order); None means all the
    tokens form one datum. Sequence-level losses (gspo) need them.
    """
    check_loss_fn(loss_fn)
    elementwise, extra_metrics = LOSSES[loss_fn](target_logprobs, inputs, config, lengths)
    if elementwise.shape != target_logprobs.shape:
        raise RuntimeError(f"{loss_fn} returned shape {list(elementwise.shape)}, "
                           f"expected {list(target_logprobs.shape)}")
    metrics = {"loss:sum": float(elementwise.detach().sum())}
    metrics.update(extra_metrics)
    return elementwise, metrics
