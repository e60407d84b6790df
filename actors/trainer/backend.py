"""The torch trainer backend: a transformers model, batched multi-LoRA slots, AdamW per slot.

This is the trainer backend interface (a Megatron backend implements the same
methods): create/drop an adapter slot, forward_backward with a Tinker loss,
optim_step, export an adapter, save/load a slot's training state (checkpoints).
Slot 0 is the bare base model and is never assigned.

Data parallelism: every DP rank holds the same weights and gets a shard of the datums.
Tinker losses are sums over tokens and datums, so the full batch's gradient is the
SUM of the shards' gradients: `optim_step` all-reduces (SUM) the slot's gradients and
then every rank runs the identical clip + AdamW step, so weights stay identical.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from actors.lora import (
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_PREFIX, LoraSlots, load_peft_adapter, module_kind,
    save_peft_adapter, trains_kind,
)
from actors.model_loading import load_causal_lm
from actors.trainer.losses import check_loss_fn, compute_loss
from actors.trainer.optim import SlotAdamW, validate_adam_params
from cluster.config import ClusterConfig
from cluster.messages import AdamParams, DatumBatch, ForwardBackwardResult, LoraSpec

log = logging.getLogger(__name__)

TARGET_TOKENS = "target_tokens"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_FORMAT = "tinkerd-slot-adamw-v1"
MOMENTS = ("exp_avg", "exp_avg_sq")


class TorchTrainerBackend:
    def __init__(self, config: ClusterConfig, rank: int = 0, world_size: int = 1,
                 local_world_size: int | None = None):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        if config.trainer.device == "cpu":
            # ranks sharing a machine share its cores; oversubscription slows everyone
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (local_world_size or world_size)))
        self.model = load_causal_lm(config.model.path, config.trainer.dtype, config.trainer.device)
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_context = config.model.max_context
        self.slots = LoraSlots(self.model, config.trainer.max_adapters + 1, config.trainer.max_lora_rank)
        named = {f"{path}.{kind}": getattr(module, kind)
                 for path, module in self.slots.modules.items() for kind in ("lora_A", "lora_B")}
        self.optimizer = SlotAdamW(named, self.slots.num_slots)

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    def info(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_slots": self.num_slots,
                "max_lora_rank": self.slots.max_rank}

    # -- adapter slots -------------------------------------------------------------------

    def create_adapter(self, slot: int, spec: LoraSpec) -> None:
        """Fresh adapter in `slot` (init from spec.seed, so every DP rank inits identically)."""
        self._check_slot_index(slot)
        self.slots.init_slot(slot, spec)
        self.optimizer.reset_slot(slot)

    def drop_adapter(self, slot: int) -> None:
        self._check_slot_index(slot)
        self.slots.clear_slot(slot)
        self.optimizer.reset_slot(slot)

    def export_adapter(self, slot: int) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
        """The slot's spec and its tensors under PEFT names (`base_model.model.<path>.lora_A.weight`)."""
        self._check_adapter(slot)
        return self.slots.specs[slot], self.slots.export_slot(slot)

    def export_optimizer_state(self, slot: int) -> dict[str, torch.Tensor]:
        self._check_adapter(slot)
        return self.optimizer.export_slot_state(slot)

    def load_optimizer_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        self._check_adapter(slot)
        self.optimizer.load_slot_state(slot, state)

    # -- training-state checkpoints (save_state / load_state[_with_optimizer]) ----------

    def save_state(self, slot: int, directory: str | os.PathLike, with_optimizer: bool = True) -> int:
        """Write the slot's adapter (PEFT layout) and, optionally, its optimizer state to
        `directory`; return the checkpoint's size in bytes.

        Written into `directory + ".tmp"`, fsynced, then renamed into place, so a crash
        leaves either no checkpoint or a whole one (never a half one); an existing
        `directory` is replaced. `optimizer.safetensors` holds, in float32, each adapter
        tensor's Adam moments under its PEFT name + `.exp_avg` / `.exp_avg_sq`, cut to the
        adapter's rank like the tensors themselves (so it does not depend on this server's
        max_lora_rank), and `step`, the slot's AdamW step count.
        """
        spec, tensors = self.export_adapter(slot)
        final = Path(directory)
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():  # left by a save that crashed
            shutil.rmtree(tmp)
        save_peft_adapter(tmp, tensors, spec, self.slots.target_module_names(spec), self.config.model.name)
        if with_optimizer:
            state = {"step": torch.tensor(self.optimizer.steps[slot], dtype=torch.int64)}
            for name, (param, index) in self._peft_param_slices(spec, slot).items():
                for moment in MOMENTS:
                    value = getattr(self.optimizer, moment)[param][index]
                    state[f"{name}.{moment}"] = value.detach().to(device="cpu", dtype=torch.float32).contiguous()
            save_file(state, str(tmp / OPTIMIZER_FILE), metadata={"format": OPTIMIZER_FORMAT})
        size = sum(f.stat().st_size for f in tmp.iterdir())
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
        return size

    def load_state(self, slot: int, directory: str | os.PathLike, with_optimizer: bool,
                   seed: int | None = None) -> LoraSpec:
        """Load a checkpoint written by save_state (or any PEFT adapter of this model's
        layout) into `slot`; return its LoraSpec (rank, alpha and targets come from the
        checkpoint). Without the optimizer the slot gets fresh Adam state; with it, the
        saved moments and step count. Every DP rank reads and checks the files first and
        the ranks agree before any of them touches the slot: on error nothing changes.
        """
        try:
            self._check_slot_index(slot)
            spec, tensors, optimizer_state = self._read_state(Path(directory), with_optimizer)
            spec = dataclasses.replace(spec, seed=seed)
            rejection = None
        except ValueError as exc:
            rejection = exc
        self._agree_on_validation(rejection, what=f"checkpoint {directory}")
        self.slots.load_slot(slot, spec, tensors)
        self.optimizer.reset_slot(slot)
        if optimizer_state is not None:
            with torch.no_grad():
                for name, (param, index) in self._peft_param_slices(spec, slot).items():
                    for moment in MOMENTS:
                        target = getattr(self.optimizer, moment)[param][index]
                        target.copy_(optimizer_state[f"{name}.{moment}"].to(target.dtype))
            self.optimizer.steps[slot] = int(optimizer_state["step"])
        return spec

    def _peft_param_slices(self, spec: LoraSpec, slot: int) -> dict[str, tuple[str, tuple]]:
        """PEFT tensor name -> (optimizer param name, index of the slot's part at spec.rank)."""
        out = {}
        for path in self.slots.modules:
            if trains_kind(spec, module_kind(path)):
                out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (f"{path}.lora_A", (slot, slice(0, spec.rank)))
                out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (f"{path}.lora_B",
                                                             (slot, slice(None), slice(0, spec.rank)))
        return out

    def _read_state(self, directory: Path, with_optimizer: bool
                    ) -> tuple[LoraSpec, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Read and check a checkpoint against this model; ValueError names what is wrong."""
        if not directory.is_dir():
            raise ValueError(f"checkpoint {directory} does not exist")
        missing = [f for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if not (directory / f).is_file()]
        if missing:
            raise ValueError(f"checkpoint {directory} is incomplete: {', '.join(missing)} missing")
        try:
            spec, tensors = load_peft_adapter(directory)
        except Exception as exc:  # bad JSON, truncated safetensors, missing keys: all "corrupt"
            raise ValueError(f"checkpoint {directory} is unreadable: {type(exc).__name__}: {exc}") from None
        try:
            self.slots.validate(spec)
        except ValueError as exc:
            raise ValueError(f"checkpoint {directory} cannot be loaded here: {exc}") from None
        expected = {}
        for path, m in self.slots.modules.items():
            if trains_kind(spec, module_kind(path)):
                expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (spec.rank, m.lora_A.shape[-1])
                expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (m.lora_B.shape[1], spec.rank)
        _check_tensors(directory, "adapter", tensors, expected)
        if not with_optimizer:
            return spec, tensors, None
        if not (directory / OPTIMIZER_FILE).is_file():
            raise ValueError(f"checkpoint {directory} holds no optimizer state ({OPTIMIZER_FILE} missing); "
                             f"load it without the optimizer")
        try:
            state = load_file(str(directory / OPTIMIZER_FILE))
        except Exception as exc:
            raise ValueError(f"checkpoint {directory} has an unreadable {OPTIMIZER_FILE}: "
                             f"{type(exc).__name__}: {exc}") from None
        step = state.pop("step", None)
        if step is None or step.numel() != 1 or step.is_floating_point() or int(step) < 0:
            raise ValueError(f"checkpoint {directory}: {OPTIMIZER_FILE} has no valid step count")
        _check_tensors(directory, OPTIMIZER_FILE, state,
                       {f"{name}.{moment}": shape for name, shape in expected.items() for moment in MOMENTS})
        state["step"] = step
        return spec, tensors, state

    def _check_slot_index(self, slot: int) -> None:
        if not 0 < slot < self.num_slots:
            raise ValueError(f"adapter slot {slot} out of range 1..{self.num_slots - 1}")

    def _check_adapter(self, slot: int) -> None:
        self._check_slot_index(slot)
        if slot not in self.slots.specs:
            raise ValueError(f"adapter slot {slot} holds no adapter")

    # -- training ------------------------------------------------------------------------

    def forward_backward(self, slot: int, loss_fn: str, loss_fn_config: dict[str, float | str],
                         forward_only: bool, batch: DatumBatch) -> ForwardBackwardResult:
        """Per-datum target logprobs and loss; unless forward_only, add the loss's gradient
        (of the sum over this shard) to the slot's gradients."""
        try:
            targets, inputs = self._validated_request(slot, loss_fn, loss_fn_config, batch)
            rejection = None
        except ValueError as exc:
            rejection = exc
        self._agree_on_validation(rejection)
        with torch.set_grad_enabled(not forward_only):
            if batch.num_datums == 0:
                target_logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=self.device)
            else:
                target_logprobs = self._target_logprobs(slot, batch, targets)
            lengths = torch.tensor(np.asarray(batch.lengths), dtype=torch.int64, device=self.device)
            elementwise, metrics = compute_loss(loss_fn, target_logprobs, inputs, loss_fn_config, lengths)
            if not forward_only and batch.num_datums > 0:
                elementwise.sum().backward()
        return ForwardBackwardResult(
            lengths=np.asarray(batch.lengths, dtype=np.int64).copy(),
            logprobs=_to_numpy_f32(target_logprobs),
            elementwise_loss=_to_numpy_f32(elementwise),
            metrics=metrics,
        )

    def _agree_on_validation(self, rejection: ValueError | None, what: str = "its shard of this batch") -> None:
        """DP ranks validate different shards (or read the same files); if any rank rejects,
        every rank must reject the request, or the others would keep the effects of a
        request that failed."""
        if self.world_size > 1:
            flag = torch.tensor([0 if rejection is None else 1], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if rejection is None and int(flag.item()):
                raise ValueError(f"another data-parallel rank rejected {what} "
                                 "(its reply names the problem)")
        if rejection is not None:
            raise rejection

    def optim_step(self, slot: int, adam: AdamParams) -> dict[str, float]:
        self._check_adapter(slot)
        validate_adam_params(adam)  # before the all-reduce: a rejected step must leave grads as they were
        if self.world_size > 1:
            self._all_reduce_grads(slot)
        return self.optimizer.step(slot, adam)

    @torch.no_grad()
    def _all_reduce_grads(self, slot: int) -> None:
        """Sum the slot's gradients over all DP ranks, in one collective."""
        grads = self.optimizer.slot_grads(slot)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _target_logprobs(self, slot: int, batch: DatumBatch, targets: torch.Tensor) -> torch.Tensor:
        """logp(target) at every real position, in float32: `[T]` or `[T, K]` like targets.

        Datums are right-padded into one batch; causal attention means a real token never
        sees the padding after it, so results equal running each datum alone.
        """
        lengths = torch.tensor(np.asarray(batch.lengths), dtype=torch.int64, device=self.device)
        tokens = torch.tensor(np.asarray(batch.tokens), dtype=torch.int64, device=self.device)
        width = int(lengths.max())
        real = torch.arange(width, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
        input_ids = torch.zeros(real.shape, dtype=torch.int64, device=self.device)
        input_ids[real] = tokens
        with self.slots.use(slot):
            logits = self.model(input_ids=input_ids, attention_mask=real.long(), use_cache=False).logits
        logprobs = logits[real].float().log_softmax(dim=-1)  # [T, V], datum-major like `tokens`
        if targets.dim() == 1:
            return logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        return logprobs.gather(1, targets)

    def _validated_request(self, slot: int, loss_fn: str, loss_fn_config: dict[str, float | str],
                           batch: DatumBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Check everything before any compute; return target_tokens and the float inputs."""
        self._check_adapter(slot)
        check_loss_fn(loss_fn)
        targets, inputs = self._validated_inputs(batch)
        # the loss checks its config and inputs on an empty slice: cheap, and it fails
        # before the forward pass instead of after it
        compute_loss(loss_fn, torch.zeros((0, *targets.shape[1:]), device=self.device),
                     {name: value[:0] for name, value in inputs.items()}, loss_fn_config)
        return targets, inputs

    def _validated_inputs(self, batch: DatumBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Check the batch's shapes and token ids; return target_tokens and the float inputs."""
        lengths = np.asarray(batch.lengths)
        total = int(len(batch.tokens))
        if lengths.ndim != 1 or (lengths < 1).any():
            raise ValueError("every datum needs at least one model_input token")
        if int(lengths.sum()) != total:
            raise ValueError(f"datum lengths sum to {int(lengths.sum())} but the batch has {total} tokens")
        if len(lengths) and int(lengths.max()) > self.max_context:
            raise ValueError(f"a datum has {int(lengths.max())} tokens, more than the model's "
                             f"context window of {self.max_context}")
        if TARGET_TOKENS not in batch.loss_inputs:
            raise ValueError(f"loss_fn_inputs needs {TARGET_TOKENS!r} (got {sorted(batch.loss_inputs)})")
        for name, value in batch.loss_inputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                raise ValueError(f"loss_fn_inputs[{name!r}] has shape {list(value.shape)}; its first "
                                 f"dimension must equal the number of model_input tokens ({total})")
        self._check_token_ids("model_input", batch.tokens)
        targets_np = batch.loss_inputs[TARGET_TOKENS]
        if targets_np.ndim not in (1, 2):
            raise ValueError(f"target_tokens must be [N] or [N, K], got shape {list(targets_np.shape)}")
        self._check_token_ids(TARGET_TOKENS, targets_np)
        targets = torch.tensor(np.asarray(targets_np), dtype=torch.int64, device=self.device)
        inputs = {name: torch.tensor(np.asarray(value), dtype=torch.float32, device=self.device)
                  for name, value in batch.loss_inputs.items() if name != TARGET_TOKENS}
        return targets, inputs

    def _check_token_ids(self, what: str, ids: np.ndarray) -> None:
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"{what} has token ids outside [0, {self.vocab_size}) "
                             f"(min {int(ids.min())}, max {int(ids.max())})")


def _check_tensors(directory: Path, what: str, tensors: dict[str, torch.Tensor],
                   expected: dict[str, tuple[int, ...]]) -> None:
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"checkpoint {directory}: {what} tensors do not match this model's LoRA layout: "
                         f"missing {missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    for name, shape in expected.items():
        value = tensors[name]
        if tuple(value.shape) != shape or not value.is_floating_point():
            raise ValueError(f"checkpoint {directory}: {what} tensor {name} is {value.dtype} "
                             f"{list(value.shape)}, expected a float tensor of shape {list(shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"checkpoint {directory}: {what} tensor {name} holds NaN or inf")


def _fsync_tree(directory: Path) -> None:
    """Flush a freshly written checkpoint's files and directory entry to disk."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished `tmp` directory to `final`, replacing an existing one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def _to_numpy_f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
