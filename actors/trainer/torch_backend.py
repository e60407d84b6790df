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
from actors.model_loading import compute_threads, load_causal_lm, start_up_threads
from actors.peft import lora_tensor_names, module_kind, trains_kind
from actors.trainer.checkpoint_files import MOMENTS, SlotState
from actors.trainer.cobatch import (
    CheckedEntry, Piece, entry_results, gather_targets, piece_losses, piece_rows, plan_microbatches, to_numpy_f32,
)
from actors.trainer.interface import SlotTensorBackend, all_reduce_sum
from actors.trainer.losses import compute_loss
from actors.trainer.optim import SlotAdamW
from cluster.config import ClusterConfig
from cluster.messages import ForwardBackwardResult, LoraSpec, SlotStep
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
        self.cpu_threads = threads  # None on a GPU
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

    def run_pass(self, entries: list[CheckedEntry]) -> list[ForwardBackwardResult]:
        """The cycle's rows in one batch per microbatch (cobatch.py), each row with its entry's slot; the summed
        loss of the entries that train is backpropagated once per microbatch."""
        outputs: dict[int, list] = {}
        training = any(not c.entry.forward_only for c in entries)
        for pieces in plan_microbatches(entries, self.config.trainer.max_tokens_per_pass):
            tokens, lengths, slots = piece_rows(entries, pieces)
            with torch.set_grad_enabled(training), compute_threads(len(lengths) * int(lengths.max()), self.cpu_threads):
                per_piece = self._target_logprobs(entries, pieces, tokens, lengths, slots)
                loss = piece_losses(entries, pieces, per_piece, compute_loss, outputs)
                if loss is not None:
                    loss.backward()
        return entry_results(entries, outputs, compute_loss, self.device)

    def step_slots(self, steps: list[SlotStep]) -> list[dict[str, float]]:
        if self.world_size > 1:  # every rank is a DP rank
            all_reduce_sum([grad for step in steps for grad in self.optimizer.slot_grads(step.slot)])
        return [self.optimizer.step(step.slot, step.adam) for step in steps]

    def _target_logprobs(self, entries: list[CheckedEntry], pieces: list[Piece], tokens: np.ndarray,
                         lengths: np.ndarray, slots: np.ndarray) -> list[torch.Tensor]:
        """logp(target) at every real position of each piece, in float32: `[T]` or `[T, K]` like its targets.
        `tokens`, `lengths`, `slots`: the pieces' rows (cobatch.piece_rows).

        Rows are right-padded into one batch; causal attention means a real token never
        sees the padding after it, so results equal running each datum alone.
        """
        input_ids, attention_mask, real_positions = (
            None if part is None else torch.from_numpy(part).to(self.device) for part in padded_batch(tokens, lengths))
        with self.slots.use(torch.as_tensor(slots), grouped=True):  # piece after piece
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])
        if real_positions is not None:
            logits = logits.index_select(0, real_positions)
        logprobs = logits.float().log_softmax(dim=-1)  # [T, V], piece-major like `tokens`
        out, start = [], 0
        for piece in pieces:
            checked = entries[piece.entry]
            lo, hi = piece.token_range(checked)
            out.append(gather_targets(logprobs[start:start + hi - lo], checked.targets[lo:hi]))
            start += hi - lo
        return out


def padded_batch(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Rows back to back -> (input ids `[B, L]` right-padded, attention mask, flat indices of the real positions).
    Rows of one length need neither mask nor indices (None, None): the model then runs as on any unpadded batch,
    and a boolean-mask scatter and gather cost 20 ms per 32 x 256-token pass (2 CPU threads, profiled)."""
    width = int(lengths.max())
    if (lengths == width).all():
        return tokens.reshape(len(lengths), width), None, None
    real = np.arange(width)[None, :] < lengths[:, None]
    input_ids = np.zeros(real.shape, dtype=np.int64)
    input_ids[real] = tokens
    return input_ids, real.astype(np.int64), np.flatnonzero(real)
