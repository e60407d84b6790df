"""The torch trainer backend: a transformers model, batched multi-LoRA slots, AdamW per slot.

One whole model per rank (actors/trainer/interface.py is the interface it implements),
so it runs data parallel only (tp = pp = 1). Slot 0 is the bare base model and is
never assigned.

Data parallelism: every DP rank holds the same weights and gets a shard of the datums.
Tinker losses are sums over tokens and datums, so the full batch's gradient is the
SUM of the shards' gradients: `optim_step` all-reduces (SUM) the slot's gradients and
then every rank runs the identical clip + AdamW step, so weights stay identical.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from actors.lora import LoraSlots
from actors.model_loading import load_causal_lm, start_up_threads
from actors.peft import lora_tensor_names, module_kind, trains_kind
from actors.trainer.checkpoint_files import MOMENTS, SlotState
from actors.trainer.interface import SlotTensorBackend, all_reduce_sum, to_numpy_f32
from actors.trainer.losses import compute_loss
from actors.trainer.optim import SlotAdamW, validate_adam_params
from cluster.config import ClusterConfig
from cluster.messages import AdamParams, DatumBatch, ForwardBackwardResult, LoraSpec
from cluster.parallel import EXPORTING_RANK

log = logging.getLogger(__name__)


class TorchTrainerBackend(SlotTensorBackend):
    def __init__(self, config: ClusterConfig, rank: int = 0, world_size: int = 1,
                 local_world_size: int | None = None):
        super().__init__(config, rank, world_size, local_world_size)
        if self.dims.tp != 1 or self.dims.pp != 1:
            raise ValueError(f"the torch trainer backend runs data parallel only, not {self.dims.describe()}; "
                             "tensor and pipeline parallelism need --trainer-backend megatron")
        # ranks sharing a machine share its cores; oversubscription slows everyone
        threads = max(1, (os.cpu_count() or 1) // self.local_world_size) if config.trainer.device == "cpu" else None
        with start_up_threads(threads):
            self.model = load_causal_lm(config.model.path, config.trainer.dtype, config.trainer.device)
            self._device = next(self.model.parameters()).device
            self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])  # before slots wrap lm_head
            self.slots = LoraSlots(self.model, config.trainer.max_adapters + 1, config.trainer.max_lora_rank)
            self.optimizer = SlotAdamW(self.slots.named_slot_params(), self.slots.num_slots)

    @property
    def device(self) -> torch.device:
        return self._device

    # -- adapter slots -------------------------------------------------------------------

    def gather_slot_state(self, slot: int, with_optimizer: bool) -> SlotState | None:
        """DP ranks hold the same state, so the exporting rank has all of it already."""
        self.check_adapter(slot)
        if self.rank != EXPORTING_RANK:
            return None
        spec = self.slots.specs[slot]
        slices = self._peft_param_slices(spec, slot)  # one copy each, straight into float32 arrays
        tensors = {name: to_numpy_f32(self.optimizer.params[param][index]) for name, (param, index) in slices.items()}
        if not with_optimizer:
            return SlotState(spec, tensors)
        moments = {f"{name}.{moment}": to_numpy_f32(getattr(self.optimizer, moment)[param][index])
                   for name, (param, index) in slices.items() for moment in MOMENTS}
        return SlotState(spec, tensors, moments, self.optimizer.steps[slot])

    @torch.no_grad()
    def scatter_slot_state(self, slot: int, state: SlotState) -> None:
        tensors = {name: torch.from_numpy(np.array(value)) for name, value in state.tensors.items()}
        self.slots.load_slot(slot, state.spec, tensors)
        self.optimizer.reset_slot(slot)
        if state.moments is None:
            return
        for name, (param, index) in self._peft_param_slices(state.spec, slot).items():
            for moment in MOMENTS:
                target = getattr(self.optimizer, moment)[param][index]
                target.copy_(torch.from_numpy(np.array(state.moments[f"{name}.{moment}"])).to(target.dtype))
        self.optimizer.steps[slot] = state.step

    def _peft_param_slices(self, spec: LoraSpec, slot: int) -> dict[str, tuple[str, tuple]]:
        """PEFT tensor name -> (optimizer param name, index of the slot's part at spec.rank)."""
        out = {}
        for path in self.slots.modules:
            if trains_kind(spec, module_kind(path)):
                a_name, b_name = lora_tensor_names(path)
                out[a_name] = (f"{path}.lora_A", (slot, slice(0, spec.rank)))
                out[b_name] = (f"{path}.lora_B", (slot, slice(None), slice(0, spec.rank)))
        return out

    # -- training ------------------------------------------------------------------------

    def forward_backward(self, slot: int, loss_fn: str, loss_fn_config: dict[str, float | str],
                         forward_only: bool, batch: DatumBatch) -> ForwardBackwardResult:
        """Per-datum target logprobs and loss; unless forward_only, add the loss's gradient
        (of the sum over this shard) to the slot's gradients."""
        targets, inputs = self.checked_request(slot, loss_fn, loss_fn_config, batch)
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
            logprobs=to_numpy_f32(target_logprobs),
            elementwise_loss=to_numpy_f32(elementwise),
            metrics=metrics,
        )

    def optim_step(self, slot: int, adam: AdamParams) -> dict[str, float]:
        self.check_adapter(slot)
        validate_adam_params(adam)  # before the all-reduce: a rejected step must leave grads as they were
        if self.world_size > 1:  # every rank is a DP rank
            all_reduce_sum(self.optimizer.slot_grads(slot))
        return self.optimizer.step(slot, adam)

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
