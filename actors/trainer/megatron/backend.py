"""The Megatron trainer backend: megatron-core's GPTModel split over tensor and pipeline ranks.

Each rank holds its TP shard of its pipeline stage (model.py, weights.py), with
multi-LoRA slot tensors on the parallel linears (lora.py) and AdamW per slot over this
rank's part of them (actors/trainer/optim.py, the torch backend's optimizer). The
interface is actors/trainer/interface.py; every method is a collective over the ranks.

- a clock cycle's pass (every entry's DP shard, each row with its slot) runs through
  megatron-core's schedule (passes.py); the losses and logprobs are known on the last
  stage, whose TP rank 0 reports them.
- an optim step sums gradients over the DP group, takes the norm of the whole gradient
  (TP-sharded tensors summed over TP, every stage's summed over PP), clips by it and
  steps: every rank of a layout ends with the same step as one whole model would take.
- A slot's state leaves and enters as full PEFT-named arrays, independent of TP/PP:
  gathered over TP in each stage, then over PP onto EXPORTING_RANK; loaded by every rank
  from the full arrays, each keeping its shard. So checkpoints match the torch
  backend's byte layout and load into it, and the other way round.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from transformers import AutoConfig

from actors.model_loading import DTYPES
from actors.peft import module_kind, peft_name, trains_kind
from actors.trainer.checkpoint_files import MOMENTS, SlotState
from actors.trainer.cobatch import CheckedEntry, entry_results, plan_microbatches
from actors.trainer.interface import SlotTensorBackend, all_reduce_sum
from actors.trainer.losses import compute_loss
from actors.trainer.megatron.cpu_shims import apply_cpu_shims
from actors.trainer.megatron.lora import wrap_gpt_model
from actors.trainer.megatron.model import build_gpt_model, check_supported_config, init_model_parallel
from actors.trainer.megatron.passes import microbatches, run_pass
from actors.trainer.megatron.weights import load_hf_state_dict, read_hf_weights
from actors.trainer.optim import SlotAdamW
from cluster.config import ClusterConfig
from cluster.messages import ForwardBackwardResult, LoraSpec, SlotStep
from cluster.parallel import EXPORTING_RANK

log = logging.getLogger(__name__)
KINDS = ("lora_A", "lora_B")


class MegatronTrainerBackend(SlotTensorBackend):
    def __init__(self, config: ClusterConfig, rank: int = 0, world_size: int = 1,
                 local_world_size: int | None = None):
        super().__init__(config, rank, world_size, local_world_size)
        trainer = config.trainer
        cuda = trainer.device == "cuda"
        self._device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else trainer.device)
        if self._device.type == "cpu":
            apply_cpu_shims()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_world_size))
        if not dist.is_initialized():  # a lone rank: megatron-core still wants a process group
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        init_model_parallel(self.dims.tp, self.dims.pp)
        if self._device.type == "cuda":  # mcore's CUDA RNG streams (on CPU the shims replace them)
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        self._check_megatron_agrees_on_coords()
        hf_config = AutoConfig.from_pretrained(config.model.path)
        check_supported_config(hf_config, self.dims.tp, self.dims.pp)
        self.vocab_size = int(hf_config.vocab_size)
        self.model = build_gpt_model(hf_config, DTYPES[trainer.dtype], self._device)
        load_hf_state_dict(self.model, read_hf_weights(_model_dir(config.model.path)), hf_config)
        self.model.config.calculate_per_token_loss = True  # the schedule must not average Tinker's summed losses
        self.model.eval()  # no dropout anywhere (model.py sets it to 0 too)
        self.slots = wrap_gpt_model(self.model, trainer.max_adapters + 1, trainer.max_lora_rank,
                                    lambda local: self.model.decoder.layers[local].layer_number - 1, self.vocab_size)
        self.optimizer = SlotAdamW(self.slots.named_slot_params(), self.slots.num_slots)
        self._sharded = self.slots.tp_sharded_param_names()

    def _check_megatron_agrees_on_coords(self) -> None:
        """Our ParallelDims numbering must be megatron-core's, or the controller's shards
        would go to the wrong groups."""
        theirs = (parallel_state.get_data_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_pipeline_model_parallel_rank())
        ours = (self.coords.dp, self.coords.tp, self.coords.pp)
        if theirs != ours:
            raise RuntimeError(f"rank {self.rank}: megatron-core placed it at (dp, tp, pp) = {theirs}, "
                               f"cluster/parallel.py at {ours}")

    @property
    def device(self) -> torch.device:
        return self._device

    # -- adapter slots -------------------------------------------------------------------

    def _local_names(self, spec: LoraSpec) -> list[str]:
        """This stage's slot tensors that an adapter of `spec` uses (`<hf path>.lora_A|B`)."""
        return [f"{path}.{kind}" for path in self.slots.local_adapters
                if trains_kind(spec, module_kind(path)) for kind in KINDS]

    @staticmethod
    def _at_rank(tensor: torch.Tensor, name: str, slot: int, rank: int) -> torch.Tensor:
        """The slot's `[rank, in]` / `[out, rank]` part of a slot-shaped tensor."""
        return tensor[slot, :rank] if name.endswith(".lora_A") else tensor[slot, :, :rank]

    def gather_slot_state(self, slot: int, with_optimizer: bool) -> SlotState | None:
        """Collective: the slot's tensors (and moments) in full on EXPORTING_RANK."""
        self.check_adapter(slot)
        spec = self.slots.specs[slot]
        sources = {"": self.slots.named_slot_params()}
        if with_optimizer:
            sources.update({f".{moment}": getattr(self.optimizer, moment) for moment in MOMENTS})
        merged = self.gather_full_slot(slot, spec, sources)
        if merged is None:
            return None
        tensors = {k: v for k, v in merged.items() if k.endswith(".weight")}
        moments = {k: v for k, v in merged.items() if not k.endswith(".weight")} if with_optimizer else None
        return SlotState(spec, tensors, moments, self.optimizer.steps[slot] if with_optimizer else 0)

    def gather_full_slot(self, slot: int, spec: LoraSpec, sources: dict[str, dict[str, torch.Tensor]]
                         ) -> dict[str, np.ndarray] | None:
        """Collective: slot `slot`'s part of slot-shaped tensors (parameters, moments,
        gradients; `sources[suffix][name]`), as full float32 arrays named `<peft name><suffix>`,
        on EXPORTING_RANK; None elsewhere. TP-gathered within each stage of DP group 0 (the
        other DP groups hold the same), then PP-gathered."""
        if self.coords.dp != 0:
            return None
        names = self._local_names(spec)
        stage = {}
        for suffix, tensors in sources.items():
            local = {name: self._at_rank(tensors[name], name, slot, spec.rank) for name in names}
            for name, full in self.slots.gather_full(local).items():
                stage[peft_name(name) + suffix] = full.float().cpu().numpy()
        if self.coords.tp != 0:
            return None
        stages = [stage]
        if self.dims.pp > 1:
            stages = [None] * self.dims.pp if self.rank == EXPORTING_RANK else None
            group = parallel_state.get_pipeline_model_parallel_group()
            dist.gather_object(stage, stages, dst=EXPORTING_RANK, group=group)
        if self.rank != EXPORTING_RANK:
            return None
        return {k: v for part in stages for k, v in part.items()}

    @torch.no_grad()
    def scatter_slot_state(self, slot: int, state: SlotState) -> None:
        """Every rank has the whole state (it read the files): each keeps its own shards."""
        self.slots.load_slot(slot, state.spec, {k: torch.from_numpy(np.array(v)) for k, v in state.tensors.items()})
        self.optimizer.reset_slot(slot)
        if state.moments is None:
            return
        for name in self._local_names(state.spec):
            for moment in MOMENTS:
                full = torch.from_numpy(np.array(state.moments[f"{peft_name(name)}.{moment}"]))
                target = self._at_rank(getattr(self.optimizer, moment)[name], name, slot, state.spec.rank)
                target.copy_(self.slots.local_shard(name, full).to(target.dtype))
        self.optimizer.steps[slot] = state.step

    # -- training ------------------------------------------------------------------------

    def run_pass(self, entries: list[CheckedEntry]) -> list[ForwardBackwardResult]:
        plan = plan_microbatches(entries, self.config.trainer.max_tokens_per_pass, min_count=self.dims.pp)
        outputs = None
        if plan:  # every rank of a DP group has the same shard: all run, or none
            parts = microbatches(entries, plan, self.device)
            outputs = run_pass(self.model, entries, parts, self.vocab_size, lambda part: self.slots.use(part.slots))
        # a stage before the last knows no loss: zeros (the reporting rank is on the last stage)
        return entry_results(entries, outputs or {}, compute_loss, self.device)

    def step_slots(self, steps: list[SlotStep]) -> list[dict[str, float]]:
        if self.dims.dp > 1:
            grads = [grad for step in steps for grad in self.optimizer.slot_grads(step.slot)]
            all_reduce_sum(grads, parallel_state.get_data_parallel_group())
        return [self.optimizer.step(step.slot, step.adam, grad_norm=self._grad_norm(step.slot)) for step in steps]

    @torch.no_grad()
    def _grad_norm(self, slot: int) -> float:
        """The norm of the slot's whole gradient, the same on every rank."""
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, param in self.optimizer.params.items():
            squares = param.grad[slot].double().pow(2).sum()
            if name in self._sharded:
                sharded += squares
            else:
                replicated += squares
        if self.dims.tp > 1:
            dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
        total = sharded + replicated
        if self.dims.pp > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return float(total.sqrt())



def _model_dir(path: str) -> str:
    """A local directory as is; a hub id resolved through the Hugging Face cache (the
    same files transformers' from_pretrained reads)."""
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
