"""Batched multi-LoRA: many adapters share one frozen base model.

Every targeted nn.Linear is replaced by a MultiLoraLinear holding *slot tensors*
`lora_A[S, r_max, in]` and `lora_B[S, out, r_max]`. A forward pass carries one slot
index per example (`LoraSlots.use(indices)`), so examples of different adapters can
share a batch. Slot 0 is the bare base model and is never assigned.

A slot of rank r < r_max uses the first r rows of A / columns of B; the rest get
exactly zero gradients (a one-slot batch slices them off, a mixed batch multiplies
them by `rank_mask`). A module a slot does not train (e.g. `train_mlp=False`) gets
scaling 0 and zero weights, so it contributes nothing and its gradients are zero too.

Adapters leave and enter in PEFT layout (actors/peft.py: `base_model.model.<path>.lora_A.weight`
[r, in] / `lora_B.weight` [out, r]), the format peft, vLLM and SGLang load.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from actors.peft import lora_tensor_names, module_kind, trains_kind
from cluster.messages import LoraSpec

BASE_SLOT = 0

# a slot of rank < r_max trains a strided view of lora_B (_slot_part), whose gradient is the matching view of the
# slot tensor's: autograd warns that such a leaf's gradient is not contiguous, which is the point here
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


def validate_lora_spec(spec: LoraSpec, max_rank: int) -> None:
    if spec.rank < 1 or spec.rank & (spec.rank - 1):
        raise ValueError(f"LoRA rank must be a power of 2, got {spec.rank}")
    if spec.rank > max_rank:
        raise ValueError(f"LoRA rank {spec.rank} exceeds this server's maximum {max_rank}")
    if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
        raise ValueError("at least one of train_attn, train_mlp, train_unembed must be set")


def draw_lora_a(spec: LoraSpec, module_shapes: Mapping[str, tuple[int, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A fresh full A `[rank, in]` (kaiming-uniform, as PEFT) for each trained module, in order.

    `module_shapes` is the whole model's (path -> (in, out)) in HF module order. One
    generator seeded with spec.seed serves all modules, so a module's A depends on every
    trained module before it: every backend walks the whole list, whatever part of the
    model it holds, and so inits identically at any parallel layout.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(spec.seed or 0))
    for path, (in_features, _) in module_shapes.items():
        if not trains_kind(spec, module_kind(path)):
            continue
        a = torch.empty(spec.rank, in_features)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5))
        a.uniform_(-bound, bound, generator=generator)
        yield path, a


class AdapterSelection:
    """Shared by every LoRA layer of one model: which slot each batch row uses."""

    def __init__(self):
        self.per_row: torch.Tensor | None = None  # long [B]
        self.single: int | None = None  # fast path: the whole batch uses one slot
        self.segments: list[tuple[int, int, int]] | None = None  # (slot, first row, end row), rows grouped by slot

    @contextlib.contextmanager
    def use(self, slots: int | torch.Tensor, grouped: bool = False):
        """Run the model with one slot for the whole batch, or one slot per batch row.

        `grouped`: the rows of each slot are contiguous (a trainer pass, entry after entry).
        Then each slot's block of rows goes through its own slot's weights (MultiLoraLinear._add_segment_terms),
        instead of a weight copy gathered per row and batched matmuls: a pass of 8 models x 4 rows x
        32 tokens took 291 ms instead of 360 before the blocks were batched too."""
        self.single, self.per_row, self.segments = None, None, None
        if isinstance(slots, torch.Tensor):
            unique = torch.unique(slots)
            if len(unique) == 1:
                self.single = int(unique[0])
            elif grouped:
                self.segments = _segments(slots.tolist())
            else:
                self.per_row = slots
        else:
            self.single = int(slots)
        try:
            yield
        finally:
            self.single, self.per_row, self.segments = None, None, None


def _segments(slots: list[int]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if out and out[-1][0] == slot:
            out[-1] = (slot, out[-1][1], row + 1)
        else:
            out.append((slot, row, row + 1))
    if len({slot for slot, _, _ in out}) != len(out):
        raise ValueError(f"grouped adapter slots are not contiguous: {slots}")
    return out


class SlotSettings:
    """Each slot's rank and scaling, for an nn.Module holding slot tensors (a mixin).

    Buffers `rank_mask[S, r_max]` and `scaling[S]` serve mixed batches; the same rank and
    scaling as Python numbers serve the one-slot path: reading the buffers (a sync each)
    and masking A are ops of their own, and a small model's step is mostly per-op
    overhead (2-6% of a built-in model's decode step).
    """

    def init_slot_settings(self, num_slots: int, max_rank: int, dtype: torch.dtype, device) -> None:
        self.register_buffer("rank_mask", torch.zeros(num_slots, max_rank, device=device, dtype=dtype))
        self.register_buffer("scaling", torch.zeros(num_slots, device=device, dtype=dtype))
        self.slot_rank = [0] * num_slots
        self.slot_scaling = [0.0] * num_slots

    @torch.no_grad()
    def set_slot(self, slot: int, rank: int, scaling: float) -> None:
        """Rank and scaling of `slot` (0, 0.0: the slot leaves this layer alone)."""
        self.rank_mask[slot].zero_()
        if rank:
            self.rank_mask[slot, :rank] = 1.0
        self.scaling[slot] = scaling
        self.slot_rank[slot] = rank
        self.slot_scaling[slot] = float(self.scaling[slot])  # rounded to the buffer's dtype


class MultiLoraLinear(nn.Module, SlotSettings):
    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, selection: AdapterSelection):
        super().__init__()
        self.base = base
        self.selection = selection
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(num_slots, max_rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(num_slots, base.out_features, max_rank, device=dev, dtype=dt))
        self.init_slot_settings(num_slots, max_rank, dt, dev)
        self._leaves: dict[tuple, tuple] = {}  # _slot_part's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scaling * (x A^T) B^T. The second matmul adds the LoRA term into the base output in place
        (addmm_ / baddbmm_, scaling as its alpha or applied to the rank-wide `x A^T`): a separate scale and add
        each passed over the whole output, and took 0.20 of a 32 x 256-token training step's CPU time
        (built-in model, torch profiler). The base output is made in the shape the matmul adds into, never as a
        view of another tensor: an in-place add into a view makes autograd copy the whole gradient."""
        selection = self.selection
        if selection.single is not None:
            return self._add_slot_term(x, selection.single)
        if selection.segments is not None:
            return self._add_segment_terms(x, selection.segments)
        per_example = selection.per_row
        if per_example is None:
            return self.base(x)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        out = self.base(rows)
        a = self.lora_A[per_example] * self.rank_mask[per_example].unsqueeze(-1)  # [B, r, in]
        low = torch.bmm(rows, a.transpose(1, 2)) * self.scaling[per_example].view(-1, 1, 1)
        return out.baddbmm_(low, self.lora_B[per_example].transpose(1, 2)).view(*x.shape[:-1], out.shape[-1])

    def _apply(self, fn, recurse=True):
        self._leaves.clear()  # views of the tensors a move (.to, offload) replaces: they would keep those alive
        return super()._apply(fn, recurse)

    def _slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A `[rank, in]` and B `[out, rank]` of `slot`: its first `rank` rows / columns only, so the rest stay out
        of the graph and their gradients are exactly zero, as the mask makes them in the per-row path."""
        rank = self.slot_rank[slot]
        return (_slot_part(self.lora_A, (slot, slice(0, rank)), self._leaves),
                _slot_part(self.lora_B, (slot, slice(None), slice(0, rank)), self._leaves))

    def _leaves_alone(self, slot: int) -> bool:
        return slot == BASE_SLOT or self.slot_scaling[slot] == 0.0

    def _add_slot_term(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """base(x) plus the LoRA term of `slot` (base(x) alone where the slot leaves this layer alone)."""
        if self._leaves_alone(slot):
            return self.base(x)
        a, b = self._slot_weights(slot)
        flat = x.reshape(-1, x.shape[-1])
        out = self.base(flat)
        return out.addmm_(F.linear(flat, a), b.t(), alpha=self.slot_scaling[slot]).view(*x.shape[:-1], out.shape[-1])

    def _add_segment_terms(self, x: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """base(x) plus the LoRA terms of rows grouped by slot, each block through its own slot's weights: as
        one batched matmul when the blocks are alike (as many rows, one rank, all adapting this layer), else
        block by block. A pass of 8 models x 4 rows x 32 tokens took 203-225 ms batched, 301-313 block by
        block, and one model with all 32 rows 166-177 (built-in model, 2 CPU threads, one process)."""
        batched = self._add_batched_segment_terms(x, segments)
        if batched is not None:
            return batched
        terms = []
        for slot, first, end in segments:
            block = x[first:end].reshape(-1, x.shape[-1])
            if self._leaves_alone(slot):
                terms.append(block.new_zeros(block.shape[0], self.base.out_features))
                continue
            a, b = self._slot_weights(slot)
            terms.append(F.linear(F.linear(block, a) * self.slot_scaling[slot], b))  # scaled while rank-wide
        return self.base(x) + torch.cat(terms).view(*x.shape[:-1], -1)

    def _add_batched_segment_terms(self, x: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor | None:
        slots = [slot for slot, _, _ in segments]
        ranks = {self.slot_rank[slot] for slot in slots}
        if len({end - first for _, first, end in segments}) != 1 or len(ranks) != 1 or 0 in ranks:
            return None
        weights = [self._slot_weights(slot) for slot in slots]
        a = torch.stack([a for a, _ in weights])
        b = torch.stack([b for _, b in weights]).transpose(1, 2)
        blocks = x.reshape(len(slots), -1, x.shape[-1])  # [blocks, rows x tokens, in]: rows are block after block
        out = self.base(blocks)
        low = torch.bmm(blocks, a.transpose(1, 2))
        scalings = [self.slot_scaling[slot] for slot in slots]
        if len(set(scalings)) == 1:
            out.baddbmm_(low, b, alpha=scalings[0])
        else:
            out.baddbmm_(low * torch.tensor(scalings, dtype=low.dtype, device=low.device).view(-1, 1, 1), b)
        return out.view(*x.shape[:-1], out.shape[-1])


def _slot_part(param: torch.Tensor, index: tuple, leaves: dict) -> torch.Tensor:
    """`param[index]`; when a backward will follow, a leaf view of it whose `.grad` is a view of
    `param.grad[index]` (cached in `leaves`). Autograd then adds the slot's gradient into its part of the slot
    tensor's gradient in place (AccumulateGrad adds into a defined `.grad`), in C++: indexing the parameter
    instead makes autograd build a zero tensor the size of all slots for every layer and use, and an autograd
    function doing the add in Python cost ~10% of an 8-token step (built-in model, profiled). An engine's decode
    step runs without grad and gets the plain view."""
    if not (torch.is_grad_enabled() and param.requires_grad):
        return param[index]
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    key = (id(param), index[0], index[-1].stop)
    stored = (param.data_ptr(), param.grad.data_ptr())
    cached = leaves.get(key)
    # a replaced gradient gets a new leaf (a moved parameter too, but MultiLoraLinear._apply forgets them all)
    if cached is not None and cached[1] == stored:
        return cached[0]
    leaf = param.detach()[index].requires_grad_()
    leaf.grad = param.grad[index]
    leaves[key] = (leaf, stored)
    return leaf


class SlotOwner:
    """The slot bookkeeping every owner of a model's LoRA layers shares (LoraSlots below,
    megatron's MegatronLoraSlots). A subclass sets `num_slots`, `max_rank`, `selection` and
    `specs` and provides `module_shapes()` (the whole model's targets, in HF order),
    `named_slot_params()`, `layers_with_kind()` (each layer that has `set_slot`, with the
    module kind it adapts) and `_write_fresh_a(slot, rank, path, a)` (a fresh full A, for
    the modules this owner holds; the others are skipped)."""

    num_slots: int
    max_rank: int
    selection: AdapterSelection
    specs: dict[int, LoraSpec]

    def validate(self, spec: LoraSpec) -> None:
        validate_lora_spec(spec, self.max_rank)

    @torch.no_grad()
    def init_slot(self, slot: int, spec: LoraSpec) -> None:
        """Fresh adapter: A ~ kaiming-uniform (as PEFT does), B = 0, so outputs are unchanged."""
        self._configure(slot, spec)
        for path, a in draw_lora_a(spec, self.module_shapes()):
            self._write_fresh_a(slot, spec.rank, path, a)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.specs.pop(slot, None)
        self._write_settings(slot, None)
        self._zero_params(slot)

    @torch.no_grad()
    def _configure(self, slot: int, spec: LoraSpec) -> None:
        """`slot` as a fresh `spec` adapter with zero weights. Each layer's settings are written once
        (clearing first wrote them twice): these per-layer ops were about half of an engine's adapter load
        (profiled, built-in model)."""
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots - 1}")
        self.validate(spec)
        self._zero_params(slot)
        self.specs[slot] = spec
        self._write_settings(slot, spec)

    def _write_settings(self, slot: int, spec: LoraSpec | None) -> None:
        """Each layer's rank and scaling of `slot`: the spec's where it trains the layer, none elsewhere."""
        for kind, layer in self.layers_with_kind():
            if spec is not None and trains_kind(spec, kind):
                layer.set_slot(slot, spec.rank, spec.alpha / spec.rank)
            else:
                layer.set_slot(slot, 0, 0.0)

    def _zero_params(self, slot: int) -> None:
        for p in self.named_slot_params().values():
            p[slot].zero_()
            if p.grad is not None:
                p.grad[slot].zero_()

    def use(self, slots: int | torch.Tensor, grouped: bool = False):
        """Run the model with one slot for the whole batch, or one slot per batch row (AdapterSelection.use)."""
        return self.selection.use(slots, grouped)


class LoraSlots(SlotOwner):
    """Owns the MultiLoraLinear modules of one model (and, from SlotOwner, the slot bookkeeping)."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int):
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.selection = AdapterSelection()
        self.modules: dict[str, MultiLoraLinear] = {}
        self.specs: dict[int, LoraSpec] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        targets = [(path, m) for path, m in model.named_modules()
                   if isinstance(m, nn.Linear) and module_kind(path)]
        for path, linear in targets:
            wrapped = MultiLoraLinear(linear, num_slots, max_rank, self.selection)
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, wrapped)
            self.modules[path] = wrapped
        if not self.modules:
            raise ValueError("model has no LoRA-targetable linear layers")

    # -- slots -------------------------------------------------------------------------

    def layers_with_kind(self) -> list[tuple[str, MultiLoraLinear]]:
        return [(module_kind(path), m) for path, m in self.modules.items()]

    def _write_fresh_a(self, slot: int, rank: int, path: str, a: torch.Tensor) -> None:
        m = self.modules[path]
        m.lora_A[slot, :rank] = a.to(m.lora_A.dtype)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_slot_params().values())

    def named_slot_params(self) -> dict[str, nn.Parameter]:
        """`<hf path>.lora_A` / `.lora_B` -> slot tensor, in model order (what SlotAdamW steps)."""
        return {f"{path}.{kind}": getattr(m, kind) for path, m in self.modules.items() for kind in ("lora_A", "lora_B")}

    # -- PEFT import / export ------------------------------------------------------------

    @torch.no_grad()
    def export_slot(self, slot: int) -> dict[str, torch.Tensor]:
        spec = self.specs[slot]
        out = {}
        for path, m in self.modules.items():
            if trains_kind(spec, module_kind(path)):
                a_name, b_name = lora_tensor_names(path)
                out[a_name] = m.lora_A[slot, : spec.rank].detach().clone()
                out[b_name] = m.lora_B[slot, :, : spec.rank].detach().clone()
        return out

    @torch.no_grad()
    def load_slot(self, slot: int, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        self._configure(slot, spec)
        expected = {k for path in self.modules if trains_kind(spec, module_kind(path)) for k in lora_tensor_names(path)}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            self.clear_slot(slot)
            raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for path, m in self.modules.items():
            if not trains_kind(spec, module_kind(path)):
                continue
            a_name, b_name = lora_tensor_names(path)
            a, b = torch.as_tensor(tensors[a_name]), torch.as_tensor(tensors[b_name])
            m.lora_A[slot, : spec.rank] = a.to(m.lora_A.dtype)
            m.lora_B[slot, :, : spec.rank] = b.to(m.lora_B.dtype)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """HF module path -> (in_features, out_features) of every LoRA-wrapped module, in model order."""
        return {path: (m.base.in_features, m.base.out_features) for path, m in self.modules.items()}
