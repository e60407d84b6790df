"""Batched multi-LoRA on a megatron-core GPTModel, in the torch backend's PEFT layout.

`wrap_gpt_model` replaces each decoder layer's linear_qkv / linear_proj / linear_fc1 /
linear_fc2, and the output_layer on the last pipeline stage, with the multi-adapter
wrappers of lora_layers.py, and returns a `MegatronLoraSlots` that owns them. Like
actors/lora.LoraSlots it is an actors/lora.SlotOwner (validate, init_slot, clear_slot,
use come from there) with load_slot and export_slot, and adds what tensor and pipeline
parallelism need:

- Each wrapper holds this rank's shard of canonical adapters (one per HF linear:
  q/k/v/o_proj, gate/up/down_proj, lm_head). Slot tensors are named like the torch
  backend's, `<hf path>.lora_A` / `.lora_B`, and keep its slot layout, so SlotAdamW runs
  on `named_slot_params()` unchanged. `tp_sharded_param_names()` tells which are split over
  TP: their squared gradient norms sum over TP ranks, a replicated one counts once.
- `load_slot` takes the whole model's PEFT tensors (what an adapter file holds) and keeps
  this rank's shards; `export_slot` returns full tensors of this PP stage's modules,
  gathered over TP (a collective: every TP rank calls it); the stages' exports together
  are the whole adapter.
- `init_slot` equals the torch backend's bit for bit at any TP/PP: A is drawn in full for
  every HF module in HF order from one generator seeded with spec.seed (`actors/lora.draw_lora_a`, so
  every rank consumes the same stream, other stages' layers included), then sliced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from actors.lora import AdapterSelection, SlotOwner
from actors.peft import check_tensors, expected_lora_shapes, module_kind, peft_name, trains_kind
from actors.trainer.megatron.lora_layers import (
    CanonicalAdapter,
    ColumnParallelLora,
    ConcatLayout,
    PerQueryGroupLayout,
    RowParallelLora,
    ParallelLora,
    SlotTensorLayout,
)
from cluster.messages import LoraSpec

KINDS = ("lora_A", "lora_B")


def hf_lora_modules(num_layers: int, hidden_size: int, num_heads: int, num_query_groups: int, head_dim: int,
                    ffn_hidden_size: int, vocab_size: int) -> list[CanonicalAdapter]:
    """Every LoRA target of a dense HF decoder (Llama, Qwen2/3), in HF module order: the
    order actors/lora.LoraSlots meets them in `named_modules()`, which fixes the init stream."""
    q_out, kv_out = num_heads * head_dim, num_query_groups * head_dim
    shapes = (("self_attn.q_proj", hidden_size, q_out), ("self_attn.k_proj", hidden_size, kv_out),
              ("self_attn.v_proj", hidden_size, kv_out), ("self_attn.o_proj", q_out, hidden_size),
              ("mlp.gate_proj", hidden_size, ffn_hidden_size), ("mlp.up_proj", hidden_size, ffn_hidden_size),
              ("mlp.down_proj", ffn_hidden_size, hidden_size))
    modules = [CanonicalAdapter(f"model.layers.{layer}.{name}", fan_in, fan_out)
               for layer in range(num_layers) for name, fan_in, fan_out in shapes]
    return modules + [CanonicalAdapter("lm_head", hidden_size, vocab_size)]


class MegatronLoraSlots(SlotOwner):
    """Owns one model's (one PP stage's) LoRA wrappers and the slot bookkeeping.

    `layers` are this stage's wrappers in HF module order; `hf_modules` the whole model's
    LoRA targets in HF order (`hf_lora_modules`), for init and for checking adapter files.
    """

    def __init__(self, layers: list[ParallelLora], hf_modules: list[CanonicalAdapter],
                 num_slots: int, max_rank: int, selection: AdapterSelection):
        if not layers:
            raise ValueError("no LoRA layers on this stage")
        self.layers = list(layers)
        self.hf_modules = list(hf_modules)
        self.num_slots, self.max_rank = num_slots, max_rank
        self.selection = selection
        self.specs: dict[int, LoraSpec] = {}
        self.tp_group = self.layers[0].tp_group
        self.tp_rank = self.tp_group.rank()
        self._check_layers()
        self.params: dict[str, nn.Parameter] = {}
        self.layouts: dict[str, SlotTensorLayout] = {}
        self.local_adapters: dict[str, CanonicalAdapter] = {}
        for layer in self.layers:
            self.params.update(layer.slot_params())
            self.layouts.update(layer.layouts)
            self.local_adapters.update({a.hf_path: a for a in layer.adapters})

    def _check_layers(self) -> None:
        known = {m.hf_path: m for m in self.hf_modules}
        paths = [a.hf_path for layer in self.layers for a in layer.adapters]
        if len(set(paths)) != len(paths):
            raise ValueError("an HF module has two LoRA layers")
        for layer in self.layers:
            if layer.tp_group is not self.tp_group or layer.selection is not self.selection:
                raise ValueError("all LoRA layers of a stage must share one TP group and this owner's selection")
            if len({module_kind(a.hf_path) for a in layer.adapters}) != 1:
                raise ValueError(f"one layer mixes module kinds: {[a.hf_path for a in layer.adapters]}")
            for adapter in layer.adapters:
                if known.get(adapter.hf_path) != adapter:
                    raise ValueError(f"{adapter} is not among the model's LoRA targets")
            if len(layer.slot_rank) != self.num_slots or layer.rank_mask.shape[1] != self.max_rank:
                raise ValueError("every LoRA layer must have this owner's num_slots and max_rank")

    # -- slots -------------------------------------------------------------------------

    def layers_with_kind(self) -> list[tuple[str, ParallelLora]]:
        return [(module_kind(layer.adapters[0].hf_path), layer) for layer in self.layers]

    def _write_fresh_a(self, slot: int, rank: int, path: str, a: torch.Tensor) -> None:
        if path in self.local_adapters:  # the model's other stages hold the rest
            self._write(slot, rank, f"{path}.lora_A", a)

    def named_slot_params(self) -> dict[str, nn.Parameter]:
        """`<hf path>.lora_A` / `.lora_B` -> this rank's slot tensor, for SlotAdamW."""
        return dict(self.params)

    def tp_sharded_param_names(self) -> set[str]:
        """Slot tensors split over TP (column B, row A); the others are replicated."""
        return {name for name, layout in self.layouts.items() if layout.tp_dim is not None}

    # -- PEFT import / export ------------------------------------------------------------

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """The whole model's LoRA targets, path -> (in, out), in HF module order."""
        return {m.hf_path: (m.in_features, m.out_features) for m in self.hf_modules}

    def expected_peft_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, int]]:
        """The whole model's PEFT tensor names and shapes for `spec`."""
        return expected_lora_shapes(spec, self.module_shapes())

    @torch.no_grad()
    def load_slot(self, slot: int, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        """Load the whole model's PEFT tensors into `slot`, keeping this rank's shards.

        Names and shapes are checked before the slot is touched: on error it is unchanged.
        """
        self.validate(spec)
        check_tensors("adapter", tensors, self.expected_peft_shapes(spec))
        self._configure(slot, spec)
        for hf_path in self.local_adapters:
            if not trains_kind(spec, module_kind(hf_path)):
                continue
            for kind in KINDS:
                name = f"{hf_path}.{kind}"
                self._write(slot, spec.rank, name, torch.as_tensor(tensors[peft_name(name)]))

    @torch.no_grad()
    def export_slot(self, slot: int) -> dict[str, torch.Tensor]:
        """Full PEFT tensors of this stage's trained modules; a collective over the TP group."""
        spec = self.specs[slot]
        local = {}
        for hf_path in self.local_adapters:
            if trains_kind(spec, module_kind(hf_path)):
                local[f"{hf_path}.lora_A"] = self.params[f"{hf_path}.lora_A"][slot, : spec.rank]
                local[f"{hf_path}.lora_B"] = self.params[f"{hf_path}.lora_B"][slot, :, : spec.rank]
        return {peft_name(name): full for name, full in self.gather_full(local).items()}

    # -- shards ------------------------------------------------------------------------

    def local_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of slot tensor `name`'s full slice (`[r, in]` / `[out, r]`, any
        r), zero-padded where the local shard runs past the true vocab."""
        layout = self.layouts[name]
        if layout.tp_dim is None:
            return full
        start = self.tp_rank * layout.local_size
        real = max(0, min(layout.local_size, layout.full_size - start))
        shape = list(full.shape)
        shape[layout.tp_dim] = layout.local_size
        shard = full.new_zeros(shape)
        shard.narrow(layout.tp_dim, 0, real).copy_(full.narrow(layout.tp_dim, start, real))
        return shard

    @torch.no_grad()
    def gather_full(self, local_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full slices from this rank's parts (the inverse of local_shard), as new tensors.

        A collective over the TP group: every TP rank calls it with the same names and
        shapes (slot tensors, their gradients or Adam moments). One all-gather serves all.
        """
        sharded = [name for name in local_tensors if self.layouts[name].tp_dim is not None]
        per_rank = self._all_gather([local_tensors[name] for name in sharded])
        gathered = {}
        for index, name in enumerate(sharded):
            layout = self.layouts[name]
            full = torch.cat([parts[index] for parts in per_rank], dim=layout.tp_dim)
            gathered[name] = full.narrow(layout.tp_dim, 0, layout.full_size).to(local_tensors[name].dtype)
        return {name: gathered[name].clone() if name in gathered else tensor.detach().clone()
                for name, tensor in local_tensors.items()}

    def _all_gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every TP rank's versions of `tensors`, by rank, flattened into one collective."""
        if not tensors or self.tp_group.size() == 1:
            return [tensors]
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        buffers = [torch.empty_like(flat) for _ in range(self.tp_group.size())]
        dist.all_gather(buffers, flat, group=self.tp_group)
        sizes = [t.numel() for t in tensors]
        return [[piece.view(t.shape) for piece, t in zip(buffer.split(sizes), tensors)] for buffer in buffers]

    def _write(self, slot: int, rank: int, name: str, full: torch.Tensor) -> None:
        param = self.params[name]
        target = param[slot, :rank] if name.endswith(".lora_A") else param[slot, :, :rank]
        target.copy_(self.local_shard(name, full).to(param.dtype))


def _check_supported(config, groups: int) -> None:
    if config.num_moe_experts or config.mtp_num_layers or config.sequence_parallel:
        raise ValueError("megatron LoRA supports dense models without MTP or sequence parallelism")
    if config.attention_output_gate or not config.gated_linear_unit:
        raise ValueError("megatron LoRA needs plain q/k/v attention and a gated MLP (gate_proj/up_proj)")
    if groups % config.tensor_model_parallel_size:
        # with fewer kv groups than TP ranks a rank holds part of a group, not whole heads
        raise ValueError(f"{groups} kv groups do not split over TP {config.tensor_model_parallel_size}")


def wrap_gpt_model(model: nn.Module, num_slots: int, max_rank: int, global_layer_index: Callable[[int], int],
                   vocab_size: int) -> MegatronLoraSlots:
    """Freeze `model` (an unwrapped mcore GPTModel, local spec, one PP stage) and put LoRA
    wrappers on its linears; `global_layer_index(local)` maps this stage's decoder layers to
    the model's, `vocab_size` is the true (unpadded) vocabulary.

    Load base weights before wrapping: afterwards a wrapped linear's own parameters sit
    under `<path>.base.` in the state dict.
    """
    config = model.config
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    _check_supported(config, groups)
    hf_modules = hf_lora_modules(config.num_layers, config.hidden_size, heads, groups, config.kv_channels,
                                 config.ffn_hidden_size, vocab_size)
    by_path = {m.hf_path: m for m in hf_modules}
    reference = next(model.parameters())
    selection = AdapterSelection()
    # float32 adapters (and so float32 AdamW state) whatever the base's dtype: a bf16 base
    # on CUDA trains its LoRA in full precision
    common = dict(num_slots=num_slots, max_rank=max_rank, selection=selection,
                  dtype=torch.float32, device=reference.device)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for local_index, layer in enumerate(model.decoder.layers):
        prefix = f"model.layers.{global_layer_index(local_index)}"
        attention, mlp = layer.self_attention, layer.mlp
        local_groups = groups // attention.linear_qkv.tp_group.size()
        qkv = [by_path[f"{prefix}.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj")]
        attention.linear_qkv = ColumnParallelLora(attention.linear_qkv, qkv, PerQueryGroupLayout(local_groups),
                                                  **common)
        attention.linear_proj = RowParallelLora(attention.linear_proj, by_path[f"{prefix}.self_attn.o_proj"],
                                                **common)
        gate_up = [by_path[f"{prefix}.mlp.gate_proj"], by_path[f"{prefix}.mlp.up_proj"]]
        mlp.linear_fc1 = ColumnParallelLora(mlp.linear_fc1, gate_up, ConcatLayout(), **common)
        mlp.linear_fc2 = RowParallelLora(mlp.linear_fc2, by_path[f"{prefix}.mlp.down_proj"], **common)
        layers += [attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2]
    if model.post_process:
        model.output_layer = ColumnParallelLora(model.output_layer, [by_path["lm_head"]], ConcatLayout(), **common)
        layers.append(model.output_layer)
    return MegatronLoraSlots(layers, hf_modules, num_slots, max_rank, selection)
