"""Tinker's loss functions and the `loss_fn_inputs` each one takes (no torch here).

The API validates requests against this table before anything is queued, so a bad
datum is a 400 naming the datum and field instead of a failed future. The trainer
implements the maths (actors/trainer/losses.py); `SUPPORTED_LOSSES` is the subset it
implements today, and the one place to extend when a loss is added there.

Every input is per-token: its first dimension is the datum's model_input length and
its shape equals that of `target_tokens` (`[N]`, or `[N, K]` for top-k targets).
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET_TOKENS = "target_tokens"


@dataclass(frozen=True)
class LossInput:
    name: str
    dtype: str  # "int64" | "float32", as the SDK types it on the wire
    # value every cell takes when the datum leaves the input out; None = required
    fill: float | None = None


@dataclass(frozen=True)
class LossSpec:
    name: str
    inputs: tuple[LossInput, ...]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]


_TARGETS = LossInput(TARGET_TOKENS, "int64")
_POLICY_INPUTS = (_TARGETS, LossInput("logprobs", "float32"), LossInput("advantages", "float32"))

LOSS_SPECS: dict[str, LossSpec] = {
    # weights default to ones: the SDK's own `TrainingClient.forward` example sends
    # cross_entropy datums that carry target_tokens only
    "cross_entropy": LossSpec("cross_entropy", (_TARGETS, LossInput("weights", "float32", fill=1.0))),
    "importance_sampling": LossSpec("importance_sampling", _POLICY_INPUTS),
    "ppo": LossSpec("ppo", _POLICY_INPUTS),
    "cispo": LossSpec("cispo", _POLICY_INPUTS),
    "dro": LossSpec("dro", _POLICY_INPUTS),
    # which tokens count toward the datum's sequence-level ratio
    "gspo": LossSpec("gspo", (*_POLICY_INPUTS, LossInput("sequence_ratio_mask", "float32"))),
    # plus provenance spans naming samples recorded with record_stability_info
    "stable_reinforce": LossSpec("stable_reinforce", _POLICY_INPUTS),
}

SUPPORTED_LOSSES: frozenset[str] = frozenset({"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"})


def supported_loss_spec(loss_fn: str) -> LossSpec:
    """The spec of a loss this server runs; ValueError naming the supported ones otherwise."""
    if loss_fn not in SUPPORTED_LOSSES:
        known = "is not supported by this server yet" if loss_fn in LOSS_SPECS else "is not a loss this server knows"
        raise ValueError(f"loss_fn {loss_fn!r} {known}; supported: {', '.join(sorted(SUPPORTED_LOSSES))}")
    return LOSS_SPECS[loss_fn]
