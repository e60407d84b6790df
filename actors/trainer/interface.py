"""The trainer backend interface: what a trainer rank's model must do, whatever runs it.

A backend (picked by name, cluster/backends.py) is constructed once per rank as
`Backend(config, rank, world_size, local_world_size)`, after torch.distributed is
initialized when world_size > 1. Every method is called on every rank with the same
arguments, except `forward_backward_many`, whose entries' batches are the rank's DP
group's shards. Only numpy arrays and cluster/messages.py values cross this interface,
never torch tensors.

A backend implements adapter slots (slot 0 is the bare base model), a clock cycle's
pass over several slots each with its Tinker loss (`forward_backward_many`; slot-tensor
backends implement `run_pass`, actors/trainer/cobatch.py), optim steps of several slots
(`optim_steps`; `step_slots`), and three collectives over its ranks that move a slot's
state as full PEFT-named arrays (`checkpoint_files.SlotState`):
- `gather_slot_state(slot, with_optimizer)` returns the whole state on global rank 0 and
  None elsewhere (every TP shard and pipeline stage contributes its part);
- `scatter_slot_state(slot, state)` installs it, each rank keeping its own part;
- `module_shapes()` and `validate_spec(spec)` say what adapters this model can hold.

From those this base class builds the parts every backend shares: exporting an adapter,
checkpoint writing and reading (actors/trainer/checkpoint_files.py), and making every
rank agree before any of them changes state.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from actors.engine.interface import current_rss_bytes
from actors.peft import expected_lora_shapes, target_module_names
from actors.trainer.batch_checks import checked_loss_inputs
from actors.trainer.checkpoint_files import SlotState, read_training_state, write_training_state
from actors.trainer.cobatch import CheckedEntry
from actors.trainer.optim import SlotAdamW, validate_adam_params
from cluster.config import ClusterConfig
from cluster.messages import (
    ECHOED_REJECTION, AdamParams, DatumBatch, ForwardBackwardResult, LoraSpec, PassEntry, RankCoords, SlotStep,
)
from cluster.parallel import ParallelDims


class TrainerBackend(abc.ABC):
    def __init__(self, config: ClusterConfig, rank: int = 0, world_size: int = 1,
                 local_world_size: int | None = None):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.local_world_size = local_world_size or world_size
        self.dims: ParallelDims = config.trainer.parallel_dims()
        if self.dims.world_size != world_size:
            raise ValueError(f"the layout {self.dims.describe()} needs {self.dims.world_size} ranks, "
                             f"but this world has {world_size}")
        self.coords: RankCoords = self.dims.coords(rank)

    # -- what a backend implements ---------------------------------------------------

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def info(self) -> dict:
        """vocab_size, num_slots, max_lora_rank (what the controller and API need to know)."""

    @abc.abstractmethod
    def create_adapter(self, slot: int, spec: LoraSpec) -> None:
        """A fresh adapter in `slot`, initialised from spec.seed identically on every rank and layout."""

    @abc.abstractmethod
    def drop_adapter(self, slot: int) -> None: ...

    @abc.abstractmethod
    def forward_backward_many(self, entries: list[PassEntry]) -> list[ForwardBackwardResult | ValueError]:
        """One clock cycle's pass (actors/trainer/cobatch.py): per entry, the per-token target logprobs and loss
        of its DP shard, and unless forward_only its summed loss's gradient added to its slot's gradients; or the
        ValueError every rank refused the entry with (its slot untouched, the others ran). Results are
        meaningful on the DP group's reporting rank (ParallelDims.reporting_rank)."""

    @abc.abstractmethod
    def optim_steps(self, steps: list[SlotStep]) -> list[dict[str, float] | ValueError]:
        """Per step: sum the slot's gradients over DP, clip by the global norm, AdamW; metrics on every rank.
        The slots' gradients are all-reduced together. A refused step leaves its slot as it was."""

    def forward_backward(self, slot: int, loss_fn: str, loss_fn_config: dict[str, float | str],
                         forward_only: bool, batch: DatumBatch) -> ForwardBackwardResult:
        """One model's pass alone (what a cycle with one entry does)."""
        (outcome,) = self.forward_backward_many([PassEntry(slot=slot, loss_fn=loss_fn, loss_fn_config=loss_fn_config,
                                                           forward_only=forward_only, batch=batch)])
        if isinstance(outcome, ValueError):
            raise outcome
        return outcome

    def optim_step(self, slot: int, adam: AdamParams) -> dict[str, float]:
        (outcome,) = self.optim_steps([SlotStep(slot=slot, adam=adam)])
        if isinstance(outcome, ValueError):
            raise outcome
        return outcome

    @abc.abstractmethod
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """HF module path -> full (in_features, out_features) of every LoRA-targetable
        module, in the HF model's order (whatever shards this rank holds)."""

    @abc.abstractmethod
    def validate_spec(self, spec: LoraSpec) -> None:
        """ValueError for a LoraSpec this backend cannot hold (rank too large, nothing trained)."""

    @abc.abstractmethod
    def gather_slot_state(self, slot: int, with_optimizer: bool) -> SlotState | None:
        """Collective: the slot's whole state on EXPORTING_RANK, None on every other rank."""

    @abc.abstractmethod
    def scatter_slot_state(self, slot: int, state: SlotState) -> None:
        """Collective: install a checked state (every rank holds the whole of it) into `slot`."""

    @abc.abstractmethod
    def check_slot_index(self, slot: int) -> None: ...

    @abc.abstractmethod
    def offload(self) -> bool:
        """Colocated training: move the base weights and optimizer state off the device; False if there is
        nothing to move (a CPU trainer). Offloading an offloaded backend is a no-op."""

    @abc.abstractmethod
    def onload(self) -> bool:
        """Move back what `offload` moved; False if there was nothing to move."""

    def memory_stats(self) -> dict[str, float]:
        stats = {"rss_bytes": float(current_rss_bytes())}
        if self.device.type == "cuda":
            stats["cuda_allocated_bytes"] = float(torch.cuda.memory_allocated(self.device))
            stats["cuda_reserved_bytes"] = float(torch.cuda.memory_reserved(self.device))
        return stats

    # -- shared by every backend -----------------------------------------------------

    def adapter_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, int]]:
        """Full PEFT name -> shape for an adapter of `spec`; ValueError for a spec this model cannot hold."""
        self.validate_spec(spec)
        return expected_lora_shapes(spec, self.module_shapes())

    def export_adapter(self, slot: int) -> tuple[LoraSpec, dict[str, np.ndarray]] | None:
        """Collective: the slot's spec and full PEFT tensors (float32) on EXPORTING_RANK, else None."""
        state = self.gather_slot_state(slot, with_optimizer=False)
        return None if state is None else (state.spec, state.tensors)

    def save_state(self, slot: int, directory: str | os.PathLike, with_optimizer: bool = True) -> int:
        """Collective: EXPORTING_RANK writes the slot's checkpoint (checkpoint_files.py) and
        returns its size in bytes; the other ranks return 0."""
        state = self.gather_slot_state(slot, with_optimizer)
        return 0 if state is None else self.write_state(directory, state)

    def write_state(self, directory: str | os.PathLike, state: SlotState) -> int:
        """Write a gathered state as a checkpoint directory (atomically); return its size in bytes."""
        targets = target_module_names(state.spec, self.module_shapes())
        return write_training_state(directory, state, targets, self.config.model.name)

    def load_state(self, slot: int, directory: str | os.PathLike, with_optimizer: bool,
                   seed: int | None = None) -> LoraSpec:
        """Collective: load a checkpoint (or any PEFT adapter of this model's layout) into
        `slot`; return its spec (rank, alpha and targets come from the checkpoint). Without
        the optimizer the slot gets fresh Adam state. Every rank reads and checks the files
        and the ranks agree before any of them touches the slot: on error nothing changes."""
        try:
            self.check_slot_index(slot)
            state = read_training_state(directory, with_optimizer, self.adapter_shapes)
            state.spec = dataclasses.replace(state.spec, seed=seed)
            rejection = None
        except ValueError as exc:
            rejection = exc
        self.agree_on_validation(rejection, what=f"checkpoint {directory}")
        self.scatter_slot_state(slot, state)
        return state.spec

    def agree_on_validation(self, rejection: ValueError | None, what: str = "its shard of this batch") -> None:
        """Ranks check different shards (or read the same files); if any rank rejects, every
        rank must reject the request, or the others would keep the effects of a request
        that failed."""
        (agreed,) = self.agree_on_rejections([rejection], what)
        if agreed is not None:
            raise agreed

    def agree_on_rejections(self, rejections: list[ValueError | None], what: str = "its shard of this batch"
                            ) -> list[ValueError | None]:
        """`agree_on_validation` for several requests at once (one collective): each is refused everywhere if
        any rank refused it."""
        if self.world_size == 1 or not rejections:
            return rejections
        flags = torch.tensor([0 if r is None else 1 for r in rejections], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [ValueError(f"{ECHOED_REJECTION} {what} (its reply names the problem)")
                if rejection is None and int(flag) else rejection for rejection, flag in zip(rejections, flags)]


class SlotTensorBackend(TrainerBackend):
    """A backend whose adapters live in slot tensors, as both backends' do.

    Its `slots` owns the LoRA layers (actors/lora.LoraSlots, megatron/lora.MegatronLoraSlots:
    validate, init_slot, clear_slot, specs, num_slots, max_rank, module_shapes) and its
    `optimizer` is a SlotAdamW over them; `vocab_size` is the model's real vocabulary.
    """

    slots: Any
    optimizer: SlotAdamW
    vocab_size: int
    model: torch.nn.Module
    _offloaded: bool = False

    def offload(self) -> bool:
        """CUDA: the model (base weights, slot tensors and their gradients) and the Adam moments go to host
        memory, and the caching allocator's blocks back to the device. CPU: nothing to move (False)."""
        if self.device.type != "cuda":
            return False
        if not self._offloaded:
            self._move_state(torch.device("cpu"))
            self._offloaded = True
            torch.cuda.empty_cache()
        return True

    def onload(self) -> bool:
        if self.device.type != "cuda":
            return False
        if self._offloaded:
            self._move_state(self.device)
            self._offloaded = False
        return True

    @torch.no_grad()
    def _move_state(self, device: torch.device) -> None:
        # Module.to moves each parameter's data (and .grad) in place, so the optimizer's references stay valid
        self.model.to(device)
        self.optimizer.to(device)
        torch.cuda.synchronize()

    def info(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_slots": self.slots.num_slots,
                "max_lora_rank": self.slots.max_rank}

    def create_adapter(self, slot: int, spec: LoraSpec) -> None:
        """Fresh adapter in `slot` (init from spec.seed: the same on every rank and layout)."""
        self.check_slot_index(slot)
        self.slots.init_slot(slot, spec)
        self.optimizer.reset_slot(slot)

    def drop_adapter(self, slot: int) -> None:
        self.check_slot_index(slot)
        self.slots.clear_slot(slot)
        self.optimizer.reset_slot(slot)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return self.slots.module_shapes()

    def validate_spec(self, spec: LoraSpec) -> None:
        self.slots.validate(spec)

    def check_slot_index(self, slot: int) -> None:
        if not 0 < slot < self.slots.num_slots:
            raise ValueError(f"adapter slot {slot} out of range 1..{self.slots.num_slots - 1}")

    def check_adapter(self, slot: int) -> None:
        self.check_slot_index(slot)
        if slot not in self.slots.specs:
            raise ValueError(f"adapter slot {slot} holds no adapter")

    def forward_backward_many(self, entries: list[PassEntry]) -> list[ForwardBackwardResult | ValueError]:
        checked, rejections = [], []
        for entry in entries:  # a shard is checked by every rank of its DP group (batch_checks.py)
            try:
                self.check_adapter(entry.slot)
                targets, inputs = checked_loss_inputs(entry.loss_fn, entry.loss_fn_config, entry.batch,
                                                      self.vocab_size, self.config.model.max_context, self.device)
                checked.append(CheckedEntry.of(entry, targets, inputs))
                rejections.append(None)
            except ValueError as exc:
                checked.append(None)
                rejections.append(exc)
        rejections = self.agree_on_rejections(rejections)
        accepted = [c for c, rejection in zip(checked, rejections) if rejection is None]
        results = iter(self.run_pass(accepted) if accepted else [])
        return [rejection if rejection is not None else next(results) for rejection in rejections]

    @abc.abstractmethod
    def run_pass(self, entries: list[CheckedEntry]) -> list[ForwardBackwardResult]:
        """The accepted entries' pass: their results in order (actors/trainer/cobatch.py)."""

    def optim_steps(self, steps: list[SlotStep]) -> list[dict[str, float] | ValueError]:
        rejections = []
        for step in steps:  # every rank gets the same steps, so every rank decides the same
            try:
                self.check_adapter(step.slot)
                validate_adam_params(step.adam)  # before any collective: a refused step leaves the gradients alone
                rejections.append(None)
            except ValueError as exc:
                rejections.append(exc)
        accepted = [step for step, rejection in zip(steps, rejections) if rejection is None]
        metrics = iter(self.step_slots(accepted) if accepted else [])
        return [rejection if rejection is not None else next(metrics) for rejection in rejections]

    @abc.abstractmethod
    def step_slots(self, steps: list[SlotStep]) -> list[dict[str, float]]:
        """The accepted steps: all-reduce their slots' gradients over DP (together), then clip and step each."""


@torch.no_grad()
def all_reduce_sum(tensors: list[torch.Tensor], group=None) -> None:
    """Sum each tensor over the ranks of `group` (default: all), in one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
