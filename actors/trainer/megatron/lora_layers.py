"""Multi-adapter LoRA around megatron-core's tensor-parallel linears.

`ColumnParallelLora` wraps a ColumnParallelLinear (linear_qkv, linear_fc1, output_layer),
`RowParallelLora` a RowParallelLinear (linear_proj, linear_fc2). Both keep the base layer
as `.base`, frozen, and add `out = base_out + (h @ B.T) * (alpha / r)`, with the TP layout
SGLang uses:

- column-parallel: A `[r, in]` replicated, B `[out/tp, r]` sharded like the base's rows;
  `h = copy_to_tensor_model_parallel_region(x @ A.T)`, whose backward all-reduces, so A's
  and x's gradients are complete on every rank.
- row-parallel: A `[r, in/tp]` sharded like the base's columns, B `[out, r]` replicated;
  `h = reduce_from_tensor_model_parallel_region(x_local @ A.T)`.

Adapters are *canonical*: one per HF linear (q_proj, k_proj, v_proj inside linear_qkv;
gate_proj, up_proj inside linear_fc1), so PEFT files load and export exactly. A fused
layer computes each canonical adapter's delta on this rank's rows and scatters them into
the fused layout (`PerQueryGroupLayout`, `ConcatLayout`). The vocab-parallel output layer
stores B rows for the padded vocab; rows past the true vocab never enter the graph, so
they stay zero and get exactly-zero gradients.

Slot tensors keep actors/lora.py's layout, `lora_A[S, r_max, in_local]` and
`lora_B[S, out_local, r_max]`, so SlotAdamW steps them unchanged. mcore activations are
sequence-first `[s, b, h]`: the per-row adapter index runs over dim 1. As in actors/lora.py,
a batch of one slot takes views of the slot's first `rank` rows (the rest get exactly-zero
gradients), a mixed batch multiplies by `rank_mask`; slot 0 is the bare base model.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from torch import nn
from torch.nn import functional as F

from actors.lora import BASE_SLOT, AdapterSelection, SlotSettings


@dataclass(frozen=True)
class CanonicalAdapter:
    """One HF linear's adapter: its HF module path and full, unpadded shape."""

    hf_path: str
    in_features: int
    out_features: int

    @property
    def leaf(self) -> str:
        return self.hf_path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class SlotTensorLayout:
    """How a slot's slice of a slot tensor (`[r_max, in_local]` or `[out_local, r_max]`)
    relates to the full PEFT tensor: split over TP along `tp_dim` into equal `local_size`
    pieces, of which the first `full_size` entries are real (the rest is vocab padding);
    with `tp_dim` None it is replicated and local_size == full_size."""

    tp_dim: int | None
    local_size: int
    full_size: int


class ConcatLayout:
    """The fused output is the adapters' local outputs side by side: linear_fc1's
    `[gate_local | up_local]`, or a single adapter (linear_proj, output_layer...)."""

    def fuse(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        return deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)


class PerQueryGroupLayout:
    """linear_qkv packs its rows per query group: for each of this rank's kv groups, that
    group's q heads, then its k head, then its v head."""

    def __init__(self, local_query_groups: int):
        self.local_query_groups = local_query_groups

    def fuse(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        per_group = [d.unflatten(-1, (self.local_query_groups, -1)) for d in deltas]
        return torch.cat(per_group, dim=-1).flatten(-2)


class ParallelLora(nn.Module, SlotSettings, abc.ABC):
    """Slot tensors and slot bookkeeping of one mcore linear's canonical adapters."""

    def __init__(self, base: nn.Module, adapters: list[CanonicalAdapter], layouts: list[tuple],
                 fused_layout: ConcatLayout | PerQueryGroupLayout, num_slots: int, max_rank: int,
                 selection: AdapterSelection, dtype: torch.dtype, device: torch.device):
        super().__init__()
        if base.config.sequence_parallel or getattr(base, "is_expert", False):
            raise ValueError("megatron LoRA supports neither sequence parallelism nor expert layers")
        self.base = base
        self.adapters = list(adapters)
        self.fused_layout = fused_layout
        self.selection = selection
        self.tp_group = base.tp_group
        self.tp_rank = self.tp_group.rank()
        self.lora_dtype = dtype
        self.layouts: dict[str, SlotTensorLayout] = {}
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for adapter, (a_layout, b_layout) in zip(self.adapters, layouts):
            a_shape, b_shape = (num_slots, max_rank, a_layout.local_size), (num_slots, b_layout.local_size, max_rank)
            self.lora_A[adapter.leaf] = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=device))
            self.lora_B[adapter.leaf] = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
            self.layouts[f"{adapter.hf_path}.lora_A"] = a_layout
            self.layouts[f"{adapter.hf_path}.lora_B"] = b_layout
        self.init_slot_settings(num_slots, max_rank, dtype, device)

    def __getattr__(self, name: str):
        # GPTModel and TransformerLayer read attributes of the linear they built
        # (output_layer.weight, .sequence_parallel, backward_dw...): answer with the base's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(super().__getattr__("base"), name)

    def slot_params(self) -> dict[str, nn.Parameter]:
        """`<hf path>.lora_A` / `.lora_B` -> slot tensor, in HF module order."""
        return {f"{a.hf_path}.{kind}": getattr(self, kind)[a.leaf]
                for a in self.adapters for kind in ("lora_A", "lora_B")}

    @abc.abstractmethod
    def _rank_space(self, h: torch.Tensor) -> torch.Tensor:
        """`x @ A.T` made complete and replicated over TP, with the backward that matches."""

    def _real_rows(self, adapter: CanonicalAdapter) -> int:
        """How many of this rank's B rows are real (not vocab padding)."""
        layout = self.layouts[f"{adapter.hf_path}.lora_B"]
        if layout.tp_dim is None:
            return adapter.out_features
        return max(0, min(layout.local_size, layout.full_size - self.tp_rank * layout.local_size))

    def _pad_rows(self, delta: torch.Tensor, adapter: CanonicalAdapter) -> torch.Tensor:
        stored = self.lora_B[adapter.leaf].shape[1]
        return delta if delta.shape[-1] == stored else F.pad(delta, (0, stored - delta.shape[-1]))

    def _delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA term for `x` (`[s, b, in_local]`), fused like the base's output, in the
        adapters' dtype (float32 also under a bf16 base); None if none. The scaling multiplies the
        rank-wide `x A^T`, not the output-wide delta: one pass over the whole output less."""
        single, per_row = self.selection.single, self.selection.per_row
        x = x.to(self.lora_dtype)
        if single is not None:
            scaling = self.slot_scaling[single]
            if single == BASE_SLOT or scaling == 0.0:
                return None
            return self.fused_layout.fuse(self._single_slot_deltas(x, single, scaling))
        if per_row is None:
            return None
        if x.dim() != 3 or per_row.shape != (x.shape[1],):
            raise ValueError(f"per-row adapter slots {tuple(per_row.shape)} do not match the batch "
                             f"dim of activations {tuple(x.shape)} (mcore is [s, b, h])")
        return self.fused_layout.fuse(self._per_row_deltas(x.transpose(0, 1), per_row)).transpose(0, 1)

    def _single_slot_deltas(self, x: torch.Tensor, slot: int, scaling: float) -> list[torch.Tensor]:
        # views of the slot's first `rank` rows / columns (and real vocab rows): the rest
        # stay out of the graph, so their gradients are exactly zero
        rank = self.slot_rank[slot]
        deltas = []
        for adapter in self.adapters:
            a = self.lora_A[adapter.leaf][slot, :rank]
            b = self.lora_B[adapter.leaf][slot, : self._real_rows(adapter), :rank]
            h = self._rank_space(F.linear(x, a)) * scaling
            deltas.append(self._pad_rows(F.linear(h, b), adapter))
        return deltas

    def _per_row_deltas(self, rows: torch.Tensor, per_row: torch.Tensor) -> list[torch.Tensor]:
        """Deltas `[b, s, out_local]` of `rows` (`[b, s, in_local]`), row i with slot per_row[i]."""
        mask = self.rank_mask[per_row].unsqueeze(-1)  # [b, r, 1]: zero past each row's rank
        scaling = self.scaling[per_row].view(-1, 1, 1)
        deltas = []
        for adapter in self.adapters:
            a = self.lora_A[adapter.leaf][per_row] * mask  # [b, r, in]
            b = self.lora_B[adapter.leaf][per_row, : self._real_rows(adapter)]  # [b, out, r]
            h = self._rank_space(torch.bmm(rows, a.transpose(1, 2))) * scaling  # [b, s, r]
            deltas.append(self._pad_rows(torch.bmm(h, b.transpose(1, 2)), adapter))
        return deltas


class ColumnParallelLora(ParallelLora):
    """A ColumnParallelLinear with canonical adapters whose B rows are sharded like its own.

    `adapters` are in fused order (q, k, v / gate, up / lm_head) and `fused_layout` scatters
    their local deltas into the base's local output. A single adapter may be shorter than
    the base's output (the padded vocab of output_layer); several must fill it exactly.
    """

    def __init__(self, base: ColumnParallelLinear, adapters: list[CanonicalAdapter],
                 fused_layout: ConcatLayout | PerQueryGroupLayout, num_slots: int, max_rank: int,
                 selection: AdapterSelection, dtype: torch.dtype, device: torch.device):
        if not isinstance(base, ColumnParallelLinear):
            raise TypeError(f"expected a ColumnParallelLinear, got {type(base).__name__}")
        tp_size = base.tp_group.size()
        padded_outs = [base.output_size] if len(adapters) == 1 else [a.out_features for a in adapters]
        if sum(padded_outs) != base.output_size or any(a.out_features > p for a, p in zip(adapters, padded_outs)):
            raise ValueError(f"adapters {[a.out_features for a in adapters]} do not fit the "
                             f"layer's {base.output_size} output features")
        if any(a.in_features != base.input_size for a in adapters) or any(p % tp_size for p in padded_outs):
            raise ValueError("adapter input sizes must equal the layer's, outputs split evenly over TP")
        layouts = [(SlotTensorLayout(None, a.in_features, a.in_features),
                    SlotTensorLayout(0, padded // tp_size, a.out_features))
                   for a, padded in zip(adapters, padded_outs)]
        super().__init__(base, adapters, layouts, fused_layout, num_slots, max_rank, selection, dtype, device)

    def _rank_space(self, h: torch.Tensor) -> torch.Tensor:
        # h is already complete (A and x are replicated); the backward all-reduces dh, whose
        # rank-local parts come from this rank's B rows. dh comes from F.linear / bmm, so it is
        # contiguous, which mcore's in-place all-reduce needs.
        return copy_to_tensor_model_parallel_region(h, group=self.tp_group)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        gather = self.base.gather_output if runtime_gather_output is None else runtime_gather_output
        # the base's local output, so the delta is added before the (single) gather
        out, bias = self.base(input_, weight=weight, runtime_gather_output=False)
        delta = self._delta(input_)
        if delta is not None:
            out = out + delta.to(out.dtype)
        if gather:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, bias


class RowParallelLora(ParallelLora):
    """A RowParallelLinear with one canonical adapter whose A columns are sharded like its own."""

    def __init__(self, base: RowParallelLinear, adapter: CanonicalAdapter, num_slots: int, max_rank: int,
                 selection: AdapterSelection, dtype: torch.dtype, device: torch.device):
        if not isinstance(base, RowParallelLinear):
            raise TypeError(f"expected a RowParallelLinear, got {type(base).__name__}")
        if (adapter.in_features, adapter.out_features) != (base.input_size, base.output_size):
            raise ValueError(f"adapter shape {adapter.out_features}x{adapter.in_features} does not match "
                             f"the layer's {base.output_size}x{base.input_size}")
        layouts = [(SlotTensorLayout(1, base.input_size_per_partition, adapter.in_features),
                    SlotTensorLayout(None, adapter.out_features, adapter.out_features))]
        super().__init__(base, [adapter], layouts, ConcatLayout(), num_slots, max_rank, selection, dtype, device)

    def _rank_space(self, h: torch.Tensor) -> torch.Tensor:
        # each rank holds a partial sum over its input columns. mcore's all-reduce works in
        # place and would drop the result of a non-contiguous input: hence contiguous()
        return reduce_from_tensor_model_parallel_region(h.contiguous(), group=self.tp_group)

    def forward(self, input_: torch.Tensor):
        out, bias = self.base(input_)
        if self.base.input_is_parallel:
            local_input = input_
        else:
            local_input = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        delta = self._delta(local_input)
        return (out if delta is None else out + delta.to(out.dtype)), bias
