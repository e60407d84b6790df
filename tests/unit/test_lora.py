"""Batched multi-LoRA (actors/lora.py) on the built-in model: math, isolation, export."""

from __future__ import annotations

import pytest
import torch

from actors.lora import BASE_SLOT, LoraSlots
from actors.peft import PEFT_PREFIX, target_module_names
from actors.model_loading import load_causal_lm
from actors.trainer.optim import SlotAdamW
from cluster.messages import AdamParams, LoraSpec
from tests.numerics import assert_close_at_scale

NUM_SLOTS, MAX_RANK = 4, 8
INPUT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250], [7, 7, 300, 12, 64, 1]])


@pytest.fixture
def lora(builtin_model_dir) -> LoraSlots:
    model = load_causal_lm(str(builtin_model_dir))
    return LoraSlots(model, NUM_SLOTS, MAX_RANK)


def _logits(lora: LoraSlots, slots, grouped: bool = False) -> torch.Tensor:
    with torch.no_grad(), lora.use(slots, grouped):
        return lora.model(input_ids=INPUT_IDS).logits


def _randomize_b(lora: LoraSlots, slot: int, seed: int) -> None:
    """Give the slot nonzero B (fresh adapters have B = 0), inside its rank."""
    gen = torch.Generator().manual_seed(seed)
    rank = lora.specs[slot].rank
    with torch.no_grad():
        for m in lora.modules.values():
            if float(m.scaling[slot]) != 0.0:
                m.lora_B[slot, :, :rank] = 0.05 * torch.randn(m.lora_B.shape[1], rank, generator=gen)


def _slot_snapshot(lora: LoraSlots, slot: int) -> dict[str, torch.Tensor]:
    return {f"{path}.{kind}": getattr(m, kind)[slot].detach().clone()
            for path, m in lora.modules.items() for kind in ("lora_A", "lora_B")}


def test_fresh_adapter_leaves_outputs_unchanged(lora):
    base = _logits(lora, BASE_SLOT)
    lora.init_slot(1, LoraSpec(rank=8, seed=3))
    assert any(bool(m.lora_A[1].any()) for m in lora.modules.values())  # A is random
    assert torch.equal(_logits(lora, 1), base)


def test_training_one_slot_leaves_another_bit_identical(lora):
    lora.init_slot(1, LoraSpec(rank=4, seed=1))
    lora.init_slot(2, LoraSpec(rank=8, seed=2))
    _randomize_b(lora, 2, seed=5)
    before_logits, before_params = _logits(lora, 2), _slot_snapshot(lora, 2)
    named = {f"{p}.{k}": getattr(m, k) for p, m in lora.modules.items() for k in ("lora_A", "lora_B")}
    optimizer = SlotAdamW(named, NUM_SLOTS)

    for _ in range(2):
        with lora.use(1):
            lora.model(input_ids=INPUT_IDS).logits.logsumexp(-1).sum().backward()
        for name, p in named.items():
            assert not p.grad[2].any(), f"{name}: slot 2 got gradient from slot 1's loss"
        optimizer.step(1, AdamParams(learning_rate=1e-2, weight_decay=0.1))

    after_params = _slot_snapshot(lora, 2)
    assert all(torch.equal(before_params[k], after_params[k]) for k in before_params)
    assert torch.equal(_logits(lora, 2), before_logits)
    assert not torch.equal(_logits(lora, 1), _logits(lora, BASE_SLOT))  # slot 1 did move


def test_rank_beyond_spec_gets_no_gradient(lora):
    lora.init_slot(1, LoraSpec(rank=2, seed=1))
    _randomize_b(lora, 1, seed=9)
    with lora.use(1):
        lora.model(input_ids=INPUT_IDS).logits.logsumexp(-1).sum().backward()
    for m in lora.modules.values():
        assert not m.lora_A.grad[1, 2:].any() and not m.lora_B.grad[1, :, 2:].any()


def test_gradients_land_in_the_slot_tensors_current_grad(lora):
    """A slot trains through cached leaf views of its part of the slot tensors (lora._slot_part): a gradient
    tensor replaced since, or a module moved since, gets fresh leaves rather than the stale ones."""
    lora.init_slot(1, LoraSpec(rank=4, seed=1))
    _randomize_b(lora, 1, seed=3)
    module = next(iter(lora.modules.values()))

    def step():
        with lora.use(1):
            lora.model(input_ids=INPUT_IDS).logits.logsumexp(-1).sum().backward()

    step()
    first = module.lora_A.grad[1].clone()
    assert first.any()
    module.lora_A.grad = torch.zeros_like(module.lora_A)  # e.g. a caller clearing gradients its own way
    step()
    torch.testing.assert_close(module.lora_A.grad[1], first, rtol=1e-6, atol=0)
    lora.model.to(torch.float64)  # a move replaces the parameters' tensors (an offload does too)
    step()
    assert module.lora_A.grad.dtype == torch.float64 and module.lora_A.grad[1].any()


def _textbook(module, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """base(x) + scaling (x A^T) B^T, row by row with each row's slot (tests/bench/raw.py's LoRA)."""
    rows = []
    for row, slot in zip(x, slots):
        rank, scaling = module.slot_rank[slot], module.slot_scaling[slot]
        a, b = module.lora_A[slot, :rank], module.lora_B[slot, :, :rank]
        rows.append(module.base(row) + (row @ a.t() @ b.t()) * scaling)
    return torch.stack(rows)


def _module_grads(module, x, slots, grouped, reference: bool):
    """Output and the gradients of x, A and B (each slot's part) of one pass through `module`."""
    module.lora_A.grad = module.lora_B.grad = None
    x = x.clone().requires_grad_()
    if reference:
        out = _textbook(module, x, slots)
    else:
        with module.selection.use(slots[0] if len(set(slots)) == 1 else torch.tensor(slots), grouped):
            out = module(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, module.lora_A.grad.clone(), module.lora_B.grad.clone()


@pytest.mark.parametrize("slots, grouped", [
    ([1, 1, 1, 1], False),  # one slot: addmm_
    ([1, 1, 2, 2], True),  # blocks alike: baddbmm_
    ([1, 3, 3, 3], True),  # blocks of other sizes and ranks: block by block
    ([2, 1, 3, 1], False),  # a row's own slot: the per-row path
], ids=["single", "grouped-batched", "grouped-blocks", "per-row"])
def test_every_path_computes_the_textbook_lora_and_its_gradients(lora, slots, grouped):
    lora.init_slot(1, LoraSpec(rank=8, seed=1))
    lora.init_slot(2, LoraSpec(rank=8, seed=2, alpha=8.0))
    lora.init_slot(3, LoraSpec(rank=4, seed=3))
    for slot in (1, 2, 3):
        _randomize_b(lora, slot, seed=slot + 10)
    module = lora.modules["model.layers.0.mlp.up_proj"]
    x = torch.randn(4, 5, module.base.in_features, generator=torch.Generator().manual_seed(0))
    ours = _module_grads(module, x, slots, grouped, reference=False)
    expected = _module_grads(module, x, slots, grouped, reference=True)
    for name, got, want in zip(("output", "x.grad", "lora_A.grad", "lora_B.grad"), ours, expected):
        assert_close_at_scale(got, want, msg=name)


def test_the_lora_term_takes_no_elementwise_pass_over_the_output(lora):
    """The scaling rides on the matmul (alpha) and the term is added by it in place: no mul, add or copy of
    a tensor the size of the layer's output, forward or backward (they were 0.20 of a training step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lora.init_slot(1, LoraSpec(rank=8, seed=1))
    _randomize_b(lora, 1, seed=3)
    module = lora.modules["model.layers.0.mlp.up_proj"]
    x = torch.randn(2, 5, module.base.in_features, requires_grad=True)
    output_size = x.shape[0] * x.shape[1] * module.base.out_features
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.numel() == output_size:
                seen.append(func.__name__.split(".")[0])
            return result

    with Record(), lora.use(1):
        module(x).sum().backward()
    elementwise = [name for name in seen if name in ("mul", "mul_", "add", "add_", "copy_", "clone", "cat")]
    assert not elementwise, seen


@pytest.mark.parametrize("grouped", [False, True], ids=["per-row", "grouped"])
def test_per_example_slots_match_single_slot_runs(lora, grouped):
    lora.init_slot(1, LoraSpec(rank=4, seed=1))
    lora.init_slot(2, LoraSpec(rank=8, seed=2, train_mlp=False))
    _randomize_b(lora, 1, seed=3)
    _randomize_b(lora, 2, seed=4)
    mixed = _logits(lora, torch.tensor([1, 2]), grouped)
    torch.testing.assert_close(mixed[0], _logits(lora, 1)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], _logits(lora, 2)[1], rtol=1e-5, atol=1e-5)


def test_grouped_slots_must_be_contiguous(lora):
    with pytest.raises(ValueError, match="not contiguous"):
        with lora.use(torch.tensor([1, 2, 1]), grouped=True):
            pass


def test_export_then_load_into_another_slot_reproduces_outputs(lora):
    spec = LoraSpec(rank=4, alpha=8.0, seed=7, train_attn=False)
    lora.init_slot(1, spec)
    _randomize_b(lora, 1, seed=11)
    exported = lora.export_slot(1)
    assert all(k.startswith(PEFT_PREFIX) for k in exported)
    lora.load_slot(3, spec, exported)
    assert torch.equal(_logits(lora, 3), _logits(lora, 1))


@pytest.mark.parametrize("spec, message", [
    (LoraSpec(rank=3), "power of 2"),
    (LoraSpec(rank=16), "exceeds"),
    (LoraSpec(rank=4, train_attn=False, train_mlp=False, train_unembed=False), "at least one"),
])
def test_invalid_specs_are_rejected(lora, spec, message):
    with pytest.raises(ValueError, match=message):
        lora.init_slot(1, spec)
    assert 1 not in lora.specs


@pytest.mark.parametrize("switches, expected", [
    (dict(train_attn=True, train_mlp=False, train_unembed=False), {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (dict(train_attn=False, train_mlp=True, train_unembed=False), {"gate_proj", "up_proj", "down_proj"}),
    (dict(train_attn=False, train_mlp=False, train_unembed=True), {"lm_head"}),
])
def test_module_switches_select_modules(lora, switches, expected):
    spec = LoraSpec(rank=4, seed=1, **switches)
    lora.init_slot(1, spec)
    assert set(target_module_names(spec, lora.modules)) == expected
    # PEFT key: base_model.model.<path>.<leaf>.lora_{A,B}.weight
    exported = {k.split(".")[-3] for k in lora.export_slot(1)}
    assert exported == expected
    for path, m in lora.modules.items():
        trained = path.rsplit(".", 1)[-1] in expected
        assert (float(m.scaling[1]) != 0.0) == trained, path
        assert bool(m.lora_A[1].any()) == trained, path
