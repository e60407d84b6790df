"""AdamW per adapter slot over LoraSlots' slot tensors.

Every MultiLoraLinear holds all adapters in one tensor (`lora_A[S, r, in]`,
`lora_B[S, out, r]`), so one torch.optim.AdamW over those tensors would move every
adapter at once. `SlotAdamW` keeps Adam moments with the same slot-shaped layout and a
step count per slot, and a step for slot s reads and writes only the `[s]` slices of
parameters, gradients and moments: adapters of different training runs never touch.

The math is torch.optim.AdamW's (decoupled weight decay `p -= lr*wd*p`, bias
correction), and clipping is torch.nn.utils.clip_grad_norm_'s, applied to the slot's
global gradient norm — Tinker's `AdamParams` semantics.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.adamw import adamw

from cluster.messages import AdamParams

_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class SlotAdamW:
    def __init__(self, named_params: dict[str, nn.Parameter], num_slots: int):
        self.params = dict(named_params)
        self.num_slots = num_slots
        self.exp_avg = {name: torch.zeros_like(p, memory_format=torch.contiguous_format)
                        for name, p in self.params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p, memory_format=torch.contiguous_format)
                           for name, p in self.params.items()}
        self.steps = [0] * num_slots
        for p in self.params.values():
            if p.grad is None:
                # allocated up front so every DP rank can all-reduce a slot's gradients
                # even when its shard was empty and never ran backward
                p.grad = torch.zeros_like(p)

    @torch.no_grad()
    def to(self, device: torch.device) -> None:
        """Move the moments to `device` (the parameters and their gradients move with their module)."""
        for moments in (self.exp_avg, self.exp_avg_sq):
            for name, tensor in moments.items():
                moments[name] = tensor.to(device)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range 0..{self.num_slots - 1}")

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        """Forget a slot's moments and step count (its adapter was (re)created or dropped)."""
        self._check_slot(slot)
        for name in self.params:
            self.exp_avg[name][slot].zero_()
            self.exp_avg_sq[name][slot].zero_()
        self.steps[slot] = 0

    def slot_grads(self, slot: int) -> list[torch.Tensor]:
        """Views of the slot's gradient slices, in a fixed order (the same on every rank)."""
        self._check_slot(slot)
        return [p.grad[slot] for p in self.params.values()]

    @torch.no_grad()
    def zero_grad(self, slot: int) -> None:
        torch._foreach_zero_(self.slot_grads(slot))

    @torch.no_grad()
    def grad_norm(self, slot: int) -> float:
        norms = torch._foreach_norm(self.slot_grads(slot), 2, dtype=torch.float32)
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    @torch.no_grad()
    def step(self, slot: int, adam: AdamParams, grad_norm: float | None = None) -> dict[str, float]:
        """Apply one AdamW step to slot `slot` from its accumulated gradients, then clear them.

        `grad_norm` is the norm of the slot's whole gradient when these parameters are only
        part of it (shards of a model split over ranks); by default it is theirs.

        The update is torch.optim.AdamW's fused kernel (one pass over each tensor) on the slot's parts: a model
        has a few hundred small LoRA tensors, and one op per tensor and formula term from Python took 7.2 ms per
        slot on the built-in model's 58 tensors against 1.7 ms fused (one CPU thread); results agree to ~1e-9.
        """
        validate_adam_params(adam)
        if grad_norm is None:
            grad_norm = self.grad_norm(slot)
        grads = self.slot_grads(slot)
        if adam.grad_clip_norm > 0:
            clip_coef = adam.grad_clip_norm / (grad_norm + _CLIP_EPS)
            if clip_coef < 1.0:
                torch._foreach_mul_(grads, clip_coef)
        params = [p.data[slot] for p in self.params.values()]
        # the kernel adds 1 to each tensor's step count before it uses it: one element each, of one tensor
        steps = torch.full((len(params),), float(self.steps[slot]), device=params[0].device).unbind()
        adamw(params, grads, [self.exp_avg[name][slot] for name in self.params],
              [self.exp_avg_sq[name][slot] for name in self.params], [], list(steps), fused=True, amsgrad=False,
              beta1=adam.beta1, beta2=adam.beta2, lr=adam.learning_rate, weight_decay=adam.weight_decay,
              eps=adam.eps, maximize=False)
        self.steps[slot] += 1
        torch._foreach_zero_(grads)
        return {"grad_norm:mean": grad_norm}

    # -- state for checkpoints (save_state with optimizer) -------------------------------

    def export_slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's moments (`<param>.exp_avg`, `<param>.exp_avg_sq`) and `step`, as copies."""
        self._check_slot(slot)
        state = {"step": torch.tensor(self.steps[slot], dtype=torch.int64)}
        for name in self.params:
            state[f"{name}.exp_avg"] = self.exp_avg[name][slot].detach().clone()
            state[f"{name}.exp_avg_sq"] = self.exp_avg_sq[name][slot].detach().clone()
        return state

    @torch.no_grad()
    def load_slot_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        self._check_slot(slot)
        expected = {"step"} | {f"{n}.{k}" for n in self.params for k in ("exp_avg", "exp_avg_sq")}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"optimizer state does not match the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name in self.params:
            for key, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                value = torch.as_tensor(state[f"{name}.{key}"])
                if value.shape != moments[name][slot].shape:
                    raise ValueError(f"optimizer state {name}.{key} has shape {list(value.shape)}, "
                                     f"expected {list(moments[name][slot].shape)}")
                moments[name][slot].copy_(value)
        self.steps[slot] = int(state["step"])


def validate_adam_params(adam: AdamParams) -> None:
    if not adam.learning_rate >= 0:
        raise ValueError(f"learning_rate must be >= 0, got {adam.learning_rate}")
    for name in ("beta1", "beta2"):
        value = getattr(adam, name)
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not adam.eps >= 0:
        raise ValueError(f"eps must be >= 0, got {adam.eps}")
    if not adam.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {adam.weight_decay}")
    if not adam.grad_clip_norm >= 0:
        raise ValueError(f"grad_clip_norm must be >= 0 (0 = off), got {adam.grad_clip_norm}")
