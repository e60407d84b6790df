"""Batched multi-LoRA: many adapters share one frozen base model.

Every targeted nn.Linear is replaced by a MultiLoraLinear holding *slot tensors*
`lora_A[S, r_max, in]` and `lora_B[S, out, r_max]`. A forward pass carries one slot
index per example (`LoraSlots.use(indices)`), so examples of different adapters can
share a batch. Slot 0 is the bare base model and is never assigned.

A slot of rank r < r_max uses the first r rows of A / columns of B; the rest get
exactly zero gradients (a one-slot batch slices them off, a mixed batch multiplies
them by `rank_mask`). A module a slot does not train (e.g. `train_mlp=False`) gets
scaling 0 and zero weights, so it contributes nothing and its gradients are zero too.

Adapters leave and enter in PEFT layout (`base_model.model.<path>.lora_A.weight`
[r, in] / `lora_B.weight` [out, r]), the format peft, vLLM and SGLang load.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from cluster.messages import LoraSpec

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
BASE_SLOT = 0
PEFT_PREFIX = "base_model.model."


def module_kind(path: str) -> str | None:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ATTN_MODULES:
        return "attn"
    if leaf in MLP_MODULES:
        return "mlp"
    if leaf in UNEMBED_MODULES:
        return "unembed"
    return None


def trains_kind(spec: LoraSpec, kind: str) -> bool:
    return {"attn": spec.train_attn, "mlp": spec.train_mlp, "unembed": spec.train_unembed}[kind]


class _AdapterIndices:
    """Shared by every MultiLoraLinear of a model: which slot each example uses."""

    def __init__(self):
        self.per_example: torch.Tensor | None = None  # long [B]
        self.single: int | None = None  # fast path: the whole batch uses one slot


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, indices: _AdapterIndices):
        super().__init__()
        self.base = base
        self.indices = indices
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(num_slots, max_rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(num_slots, base.out_features, max_rank, device=dev, dtype=dt))
        self.register_buffer("rank_mask", torch.zeros(num_slots, max_rank, device=dev, dtype=dt))
        self.register_buffer("scaling", torch.zeros(num_slots, device=dev, dtype=dt))
        # the same rank and scaling as Python numbers, for the one-slot path: reading the
        # buffers (a sync each) and masking A are ops of their own, and a small model's
        # step is mostly per-op overhead (2-6% of a built-in model's decode step)
        self.slot_rank = [0] * num_slots
        self.slot_scaling = [0.0] * num_slots

    @torch.no_grad()
    def set_slot(self, slot: int, rank: int, scaling: float) -> None:
        """Rank and scaling of `slot` (0, 0.0: the slot leaves this module alone)."""
        self.rank_mask[slot].zero_()
        self.rank_mask[slot, :rank] = 1.0
        self.scaling[slot] = scaling
        self.slot_rank[slot] = rank
        self.slot_scaling[slot] = float(self.scaling[slot])  # rounded to the model's dtype, as the buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        single, per_example = self.indices.single, self.indices.per_example
        if single is not None:
            scaling = self.slot_scaling[single]
            if single == BASE_SLOT or scaling == 0.0:
                return out
            # views of the slot's first `rank` rows / columns: the rest stay out of the
            # graph, so their gradients are exactly zero, as the mask makes them below
            rank = self.slot_rank[single]
            a, b = self.lora_A[single, :rank], self.lora_B[single, :, :rank]
            return out + F.linear(F.linear(x, a), b) * scaling
        if per_example is None:
            return out
        a = self.lora_A[per_example] * self.rank_mask[per_example].unsqueeze(-1)  # [B, r, in]
        b = self.lora_B[per_example]  # [B, out, r]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        delta = delta * self.scaling[per_example].view(-1, 1, 1)
        return out + delta.reshape(out.shape)


class LoraSlots:
    """Owns the MultiLoraLinear modules of one model and the slot bookkeeping."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int):
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.indices = _AdapterIndices()
        self.modules: dict[str, MultiLoraLinear] = {}
        self.specs: dict[int, LoraSpec] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        targets = [(path, m) for path, m in model.named_modules()
                   if isinstance(m, nn.Linear) and module_kind(path)]
        for path, linear in targets:
            wrapped = MultiLoraLinear(linear, num_slots, max_rank, self.indices)
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, wrapped)
            self.modules[path] = wrapped
        if not self.modules:
            raise ValueError("model has no LoRA-targetable linear layers")

    # -- slots -------------------------------------------------------------------------

    def validate(self, spec: LoraSpec) -> None:
        if spec.rank < 1 or spec.rank & (spec.rank - 1):
            raise ValueError(f"LoRA rank must be a power of 2, got {spec.rank}")
        if spec.rank > self.max_rank:
            raise ValueError(f"LoRA rank {spec.rank} exceeds this server's maximum {self.max_rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise ValueError("at least one of train_attn, train_mlp, train_unembed must be set")

    @torch.no_grad()
    def init_slot(self, slot: int, spec: LoraSpec) -> None:
        """Fresh adapter: A ~ kaiming-uniform (as PEFT does), B = 0, so outputs are unchanged."""
        self._configure(slot, spec)
        gen = torch.Generator(device="cpu").manual_seed(int(spec.seed or 0))
        for path, m in self.modules.items():
            if not trains_kind(spec, module_kind(path)):
                continue
            a = torch.empty(spec.rank, m.lora_A.shape[-1])
            bound = 1.0 / math.sqrt(m.lora_A.shape[-1])  # kaiming_uniform_(a=sqrt(5))
            a.uniform_(-bound, bound, generator=gen)
            m.lora_A[slot, : spec.rank] = a.to(m.lora_A.dtype)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.specs.pop(slot, None)
        for m in self.modules.values():
            m.lora_A[slot].zero_()
            m.lora_B[slot].zero_()
            m.set_slot(slot, 0, 0.0)
            for p in (m.lora_A, m.lora_B):
                if p.grad is not None:
                    p.grad[slot].zero_()

    @torch.no_grad()
    def _configure(self, slot: int, spec: LoraSpec) -> None:
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots - 1}")
        self.validate(spec)
        self.clear_slot(slot)
        self.specs[slot] = spec
        for path, m in self.modules.items():
            if trains_kind(spec, module_kind(path)):
                m.set_slot(slot, spec.rank, spec.alpha / spec.rank)

    @contextlib.contextmanager
    def use(self, slots: int | torch.Tensor):
        """Run the model with one slot for the whole batch, or one slot per example."""
        if isinstance(slots, torch.Tensor):
            uniq = torch.unique(slots)
            self.indices.single = int(uniq[0]) if len(uniq) == 1 else None
            self.indices.per_example = None if len(uniq) == 1 else slots
        else:
            self.indices.single, self.indices.per_example = int(slots), None
        try:
            yield
        finally:
            self.indices.single, self.indices.per_example = None, None

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in (m.lora_A, m.lora_B)]

    # -- PEFT import / export ------------------------------------------------------------

    @torch.no_grad()
    def export_slot(self, slot: int) -> dict[str, torch.Tensor]:
        spec = self.specs[slot]
        out = {}
        for path, m in self.modules.items():
            if trains_kind(spec, module_kind(path)):
                out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A[slot, : spec.rank].detach().clone()
                out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B[slot, :, : spec.rank].detach().clone()
        return out

    @torch.no_grad()
    def load_slot(self, slot: int, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        self._configure(slot, spec)
        expected = {k for path in self.modules if trains_kind(spec, module_kind(path))
                    for k in (f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight")}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            self.clear_slot(slot)
            raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for path, m in self.modules.items():
            if not trains_kind(spec, module_kind(path)):
                continue
            a = torch.as_tensor(tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"])
            b = torch.as_tensor(tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"])
            m.lora_A[slot, : spec.rank] = a.to(m.lora_A.dtype)
            m.lora_B[slot, :, : spec.rank] = b.to(m.lora_B.dtype)

    def target_module_names(self, spec: LoraSpec) -> list[str]:
        return sorted({p.rsplit(".", 1)[-1] for p in self.modules if trains_kind(spec, module_kind(p))})


# -- PEFT files ---------------------------------------------------------------------------


ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def save_peft_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], spec: LoraSpec,
                      target_modules: list[str], base_model: str) -> int:
    """Write adapter_model.safetensors + adapter_config.json; return bytes written.

    The config spells out every LoRA field whose default differs between loaders, so
    peft, vLLM and SGLang all read the same adapter: plain LoRA with scaling
    lora_alpha / r (no rsLoRA, DoRA, LoRA bias, per-layer patterns, modules_to_save).
    `lm_head` may be a target even when the model ties it to `embed_tokens`: the LoRA
    applies to the output projection only (what peft does without
    `ensure_weight_tying`), never to the input embedding.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alpha = float(spec.alpha)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        # an int where it is one: peft and vLLM declare lora_alpha as int
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": target_modules,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        # not PEFT fields: what tinkerd needs to rebuild the LoraSpec exactly
        "tinkerd": {"train_attn": spec.train_attn, "train_mlp": spec.train_mlp,
                    "train_unembed": spec.train_unembed},
    }
    tmp = directory / "adapter_model.safetensors.tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(f.stat().st_size for f in directory.iterdir())


def load_peft_adapter(directory: str | Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    kinds = config.get("tinkerd") or {
        "train_attn": any(t in ATTN_MODULES for t in config["target_modules"]),
        "train_mlp": any(t in MLP_MODULES for t in config["target_modules"]),
        "train_unembed": any(t in UNEMBED_MODULES for t in config["target_modules"]),
    }
    spec = LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]), **kinds)
    return spec, tensors
