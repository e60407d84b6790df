"""Tinker's loss functions and the `loss_fn_inputs` each one takes (no torch here).

The API validates requests against this table before anything is queued, so a bad
datum is a 400 naming the datum and field instead of a failed future. The trainer
implements the maths (actors/trainer/losses.py); LOSS_SPECS is the one place to extend
when a loss is added there.

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
    # every datum must name the recorded samples it reproduces (provenance spans)
    needs_provenance: bool = False

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
    # provenance spans name the samples recorded with record_stability_info; the server
    # trains on the logprobs it recorded itself, so the client's `logprobs` may be left out
    "stable_reinforce": LossSpec("stable_reinforce", (_TARGETS, LossInput("logprobs", "float32", fill=0.0),
                                                      LossInput("advantages", "float32")), needs_provenance=True),
}

# loss names the SDK knows that this server does not run, and why
UNSERVED_LOSSES = {"custom": "server-side custom losses are not served (client/config leaves them off); "
                             "forward_backward_custom computes custom losses client-side"}

# filled in by the controller for stable_reinforce (1 on targets a recorded sequence sampled),
# never taken from a client: the spec above does not list it
SAMPLED_MASK = "sampled_mask"


def supported_loss_spec(loss_fn: str) -> LossSpec:
    """The spec of a loss this server runs; ValueError naming the supported ones otherwise."""
    spec = LOSS_SPECS.get(loss_fn)
    if spec is None:
        why = UNSERVED_LOSSES.get(loss_fn, "is not a loss this server knows")
        raise ValueError(f"loss_fn {loss_fn!r}: {why}; supported: {', '.join(sorted(LOSS_SPECS))}")
    return spec
