"""Megatron multi-LoRA (actors/trainer/megatron/lora*.py) against plain torch, at TP1 and TP2.

Both layouts run in ONE torch.multiprocessing spawn of two gloo ranks (starting ranks and
importing megatron-core costs seconds each): first as dp2 x tp1, where each rank is an
independent TP1 replica that runs every check, then, after destroying megatron-core's
groups, re-initialised as tp2 in the same processes. No check needs a world of one. Each
rank saves what it measured per layout; the tests below read that. The workers build
standalone mcore parallel linears from HF-style weights (q/k/v packed per query group into
linear_qkv, gate/up into linear_fc1, o_proj and down_proj row-parallel, a vocab-parallel
lm_head with padded vocab) and compare them, with adapters, to HF-shaped merged weights
`W + alpha/r * B @ A`. A tiny GPTModel checks `wrap_gpt_model` end to end.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from actors.lora import BASE_SLOT, LoraSlots  # noqa: E402
from actors.peft import module_kind, target_module_names, trains_kind  # noqa: E402
from cluster.messages import LoraSpec  # noqa: E402
from launch.cluster import free_port  # noqa: E402

TP_SIZES = (1, 2)
WORLD_SIZE = 2  # dp2 x tp1, then tp2
HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 16, 4, 2, 8, 24
VOCAB, PADDED_VOCAB = 45, 48
SEQ, BATCH = 3, 3
NUM_SLOTS, MAX_RANK = 4, 8
SPECS = {1: LoraSpec(rank=4, alpha=8.0),
         2: LoraSpec(rank=8, alpha=4.0),
         3: LoraSpec(rank=2, alpha=2.0, train_attn=False, train_unembed=False)}
MIXED_BATCHES = {"mixed_2_0_1": [2, 0, 1], "mixed_3_1_3": [3, 1, 3]}
INIT_SPECS = {"all_kinds": LoraSpec(rank=4, alpha=8.0, seed=11),
              "no_attn": LoraSpec(rank=8, alpha=8.0, seed=5, train_attn=False)}
TOLERANCE = 1e-5
INPUT_OF = {"q_proj": "hidden", "k_proj": "hidden", "v_proj": "hidden", "o_proj": "ctx", "gate_proj": "hidden",
            "up_proj": "hidden", "down_proj": "ffn", "lm_head": "hidden"}


# -- HF <-> mcore layouts, written out independently of the code under test ------------


def pack_qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v rows -> mcore's linear_qkv rows: per query group, its q heads, k head, v head."""
    per_group = [t.unflatten(0, (GROUPS, -1)) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).flatten(0, 1)


def unpack_qkv_outputs(fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q_width = HEADS // GROUPS * HEAD_DIM
    q, k, v = fused.unflatten(-1, (GROUPS, -1)).split([q_width, HEAD_DIM, HEAD_DIM], dim=-1)
    return q.flatten(-2), k.flatten(-2), v.flatten(-2)


def unpack_fc1_outputs(gathered: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The all-gathered `[gate_0 | up_0 | gate_1 | up_1 ...]` -> full gate, up."""
    halves = [piece.chunk(2, dim=-1) for piece in gathered.chunk(tp, dim=-1)]
    return torch.cat([g for g, _ in halves], dim=-1), torch.cat([u for _, u in halves], dim=-1)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def hf_modules(num_layers: int) -> list[tuple[str, int, int]]:
    """(HF path, in, out) of a tiny Qwen3 in HF module order."""
    shapes = [("self_attn.q_proj", HIDDEN, HEADS * HEAD_DIM), ("self_attn.k_proj", HIDDEN, GROUPS * HEAD_DIM),
              ("self_attn.v_proj", HIDDEN, GROUPS * HEAD_DIM), ("self_attn.o_proj", HEADS * HEAD_DIM, HIDDEN),
              ("mlp.gate_proj", HIDDEN, FFN), ("mlp.up_proj", HIDDEN, FFN), ("mlp.down_proj", FFN, HIDDEN)]
    return [(f"model.layers.{layer}.{name}", i, o) for layer in range(num_layers) for name, i, o in shapes] + [
        ("lm_head", HIDDEN, VOCAB)]


def random_adapter(spec: LoraSpec, num_layers: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, fan_in, fan_out in hf_modules(num_layers):
        if trains_kind(spec, module_kind(path)):
            tensors[f"base_model.model.{path}.lora_A.weight"] = 0.3 * torch.randn(spec.rank, fan_in, generator=gen)
            tensors[f"base_model.model.{path}.lora_B.weight"] = 0.3 * torch.randn(fan_out, spec.rank, generator=gen)
    return tensors


def merged_delta(spec: LoraSpec, tensors: dict[str, torch.Tensor], path: str) -> torch.Tensor | None:
    if not trains_kind(spec, module_kind(path)):
        return None
    a, b = (tensors[f"base_model.model.{path}.lora_{k}.weight"] for k in ("A", "B"))
    return (spec.alpha / spec.rank) * b @ a


# -- the standalone layers -------------------------------------------------------------


def _hf_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weights = {f"{leaf}.bias": 0.2 * torch.randn(out, generator=gen)
               for leaf, out in (("q_proj", HEADS * HEAD_DIM), ("k_proj", GROUPS * HEAD_DIM),
                                 ("v_proj", GROUPS * HEAD_DIM), ("o_proj", HIDDEN))}
    for path, fan_in, fan_out in hf_modules(1):
        weights[f"{path.rsplit('.', 1)[-1]}.weight"] = 0.2 * torch.randn(fan_out, fan_in, generator=gen)
    return weights


def _build_layers(tp: int, rank: int, weights: dict[str, torch.Tensor]):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from actors.trainer.megatron.lora import MegatronLoraSlots, hf_lora_modules
    from actors.trainer.megatron.lora_layers import (AdapterSelection, ColumnParallelLora, ConcatLayout,
                                                     PerQueryGroupLayout, RowParallelLora)

    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=False, gradient_accumulation_fusion=False)
    init = torch.nn.init.zeros_
    qkv = ColumnParallelLinear(HIDDEN, (HEADS + 2 * GROUPS) * HEAD_DIM, config=config, init_method=init, bias=True)
    proj = RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, config=config, init_method=init, bias=True,
                             input_is_parallel=True, skip_bias_add=True)
    fc1 = ColumnParallelLinear(HIDDEN, 2 * FFN, config=config, init_method=init, bias=False)
    fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=False,
                            input_is_parallel=False, skip_bias_add=False)
    output = ColumnParallelLinear(HIDDEN, PADDED_VOCAB, config=config, init_method=init, bias=False,
                                  skip_weight_param_allocation=True)
    w = weights
    with torch.no_grad():
        qkv.weight.copy_(pack_qkv_rows(w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]).chunk(tp)[rank])
        qkv.bias.copy_(pack_qkv_rows(w["q_proj.bias"], w["k_proj.bias"], w["v_proj.bias"]).chunk(tp)[rank])
        proj.weight.copy_(w["o_proj.weight"].chunk(tp, dim=1)[rank])
        proj.bias.copy_(w["o_proj.bias"])
        fc1.weight.copy_(torch.cat([w["gate_proj.weight"].chunk(tp)[rank], w["up_proj.weight"].chunk(tp)[rank]]))
        fc2.weight.copy_(w["down_proj.weight"].chunk(tp, dim=1)[rank])
    modules = hf_lora_modules(1, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB)
    by_leaf = {m.hf_path.rsplit(".", 1)[-1]: m for m in modules}
    selection = AdapterSelection()
    common = dict(num_slots=NUM_SLOTS, max_rank=MAX_RANK, selection=selection, dtype=torch.float32,
                  device=torch.device("cpu"))
    layers = {
        "qkv": ColumnParallelLora(qkv, [by_leaf[n] for n in ("q_proj", "k_proj", "v_proj")],
                                  PerQueryGroupLayout(GROUPS // tp), **common),
        "proj": RowParallelLora(proj, by_leaf["o_proj"], **common),
        "fc1": ColumnParallelLora(fc1, [by_leaf["gate_proj"], by_leaf["up_proj"]], ConcatLayout(), **common),
        "fc2": RowParallelLora(fc2, by_leaf["down_proj"], **common),
        "output": ColumnParallelLora(output, [by_leaf["lm_head"]], ConcatLayout(), **common),
    }
    output_weight = pad_rows(w["lm_head.weight"], PADDED_VOCAB).chunk(tp)[rank]
    return layers, output_weight, MegatronLoraSlots(list(layers.values()), modules, NUM_SLOTS, MAX_RANK, selection)


def _mcore_outputs(layers, output_weight, inputs, tp: int, rank: int) -> tuple[dict, torch.Tensor]:
    """Per HF module, the full output `[s, b, out]`; and the padded vocab's logits."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region as gather

    fused, no_bias = layers["qkv"](inputs["hidden"])
    assert no_bias is None
    q, k, v = unpack_qkv_outputs(gather(fused))
    o, o_bias = layers["proj"](inputs["ctx"].chunk(tp, dim=-1)[rank])
    gate, up = unpack_fc1_outputs(gather(layers["fc1"](inputs["hidden"])[0]), tp)
    down, _ = layers["fc2"](inputs["ffn"])
    logits, _ = layers["output"](inputs["hidden"], weight=output_weight, runtime_gather_output=True)
    outputs = {"q_proj": q, "k_proj": k, "v_proj": v, "o_proj": o + o_bias, "gate_proj": gate,
               "up_proj": up, "down_proj": down, "lm_head": logits[..., :VOCAB]}
    return outputs, logits[..., VOCAB:]


def _reference_outputs(weights, adapters, inputs, row_slots: list[int]) -> dict[str, torch.Tensor]:
    """Plain torch: per row, the HF module with its slot's merged weight."""
    outputs = {}
    for path, _, _ in hf_modules(1):
        leaf = path.rsplit(".", 1)[-1]
        rows = []
        for row, slot in enumerate(row_slots):
            weight = weights[f"{leaf}.weight"]
            delta = merged_delta(SPECS[slot], adapters[slot], path) if slot != BASE_SLOT else None
            weight = weight if delta is None else weight + delta
            rows.append(F.linear(inputs[INPUT_OF[leaf]][:, row], weight, weights.get(f"{leaf}.bias")))
        outputs[leaf] = torch.stack(rows, dim=1)
    return outputs


def _loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    # through a transpose, as GPTModel's [s, b] -> [b, s] logits: non-contiguous output grads
    return sum((out.transpose(0, 1) * torch.randn(out.transpose(0, 1).shape, generator=gen)).sum()
               for _, out in sorted(outputs.items()))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _max_relative_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max difference over the reference's largest magnitude (gradients here reach ~40)."""
    return _max_diff(a, b) / max(float(t.abs().max()) for t in b.values())


# -- checks run inside each rank -------------------------------------------------------


def _forward_checks(layers, output_weight, slots, weights, adapters, inputs, tp, rank) -> dict:
    run = lambda: _mcore_outputs(layers, output_weight, inputs, tp, rank)  # noqa: E731
    results = {"forward_vs_reference": {}, "mixed_vs_single": {}, "padding_logits_max": 0.0}
    single = {}
    with torch.no_grad():
        for slot in (BASE_SLOT, *SPECS):
            with slots.use(slot):
                single[slot], padding = run()
            reference = _reference_outputs(weights, adapters, inputs, [slot] * BATCH)
            results["forward_vs_reference"][f"slot{slot}"] = _max_diff(single[slot], reference)
            results["padding_logits_max"] = max(results["padding_logits_max"], float(padding.abs().max()))
        for case, row_slots in MIXED_BATCHES.items():
            with slots.use(torch.tensor(row_slots)):
                mixed, padding = run()
            reference = _reference_outputs(weights, adapters, inputs, row_slots)
            results["forward_vs_reference"][case] = _max_diff(mixed, reference)
            by_rows = {k: torch.stack([single[s][k][:, r] for r, s in enumerate(row_slots)], 1) for k in mixed}
            results["mixed_vs_single"][case] = _max_diff(mixed, by_rows)
            results["padding_logits_max"] = max(results["padding_logits_max"], float(padding.abs().max()))
    untrained = [k for k in ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")
                 if not torch.equal(single[3][k], single[BASE_SLOT][k])]
    results["untrained_modules_changed"] = untrained
    return results


def _reference_grads(weights, adapters, inputs, row_slots) -> dict[str, torch.Tensor]:
    """Gradients of `_loss` w.r.t. each used slot's HF-shaped A and B."""
    leaves = {slot: {name: t.clone().requires_grad_() for name, t in adapters[slot].items()}
              for slot in set(row_slots) - {BASE_SLOT}}
    _loss(_reference_outputs(weights, {**adapters, **leaves}, inputs, row_slots)).backward()
    return {f"{slot}:{name}": t.grad for slot, named in leaves.items() for name, t in named.items()}


def _gathered_grads(slots, row_slots) -> dict[str, torch.Tensor]:
    """Full HF-shaped gradients of each used slot's A and B, gathered over TP."""
    full = {}
    for slot in sorted(set(row_slots) - {BASE_SLOT}):
        spec = SPECS[slot]
        local = {name: p.grad[slot, : spec.rank] if name.endswith("lora_A") else p.grad[slot, :, : spec.rank]
                 for name, p in slots.named_slot_params().items()
                 if trains_kind(spec, module_kind(name.rsplit(".", 1)[0]))}
        full.update({f"{slot}:base_model.model.{n}.weight": t for n, t in slots.gather_full(local).items()})
    return full


def _zero_grad_violations(slots, row_slots) -> list[str]:
    """Where gradients must be exactly zero: unused slots, past a slot's rank, untrained
    kinds, lm_head's padded vocab rows; and where they must not be."""
    violations = []
    vocab_layout = slots.layouts["lm_head.lora_B"]
    real_rows = max(0, vocab_layout.full_size - slots.tp_rank * vocab_layout.local_size)
    for name, p in slots.named_slot_params().items():
        is_a = name.endswith("lora_A")
        for slot in range(NUM_SLOTS):
            grad = p.grad[slot]
            spec = SPECS.get(slot)
            if slot not in row_slots or slot == BASE_SLOT or not trains_kind(spec, module_kind(name.rsplit(".", 1)[0])):
                if grad.any():
                    violations.append(f"{name}[{slot}] should have no gradient")
                continue
            inside = grad[: spec.rank] if is_a else grad[:, : spec.rank]
            outside = grad[spec.rank:] if is_a else grad[:, spec.rank:]
            if outside.any() or not inside.any():
                violations.append(f"{name}[{slot}] gradient beyond rank {spec.rank} / none inside")
            if name == "lm_head.lora_B" and grad[real_rows:].any():
                violations.append(f"{name}[{slot}] gradient on padded vocab rows")
    return violations


def _grad_checks(layers, output_weight, slots, weights, adapters, inputs, tp, rank) -> dict:
    results = {"grad_vs_reference": {}, "grads": {}, "zero_grad_violations": []}
    cases = {"single_1": [1] * BATCH, "single_3": [3] * BATCH, **MIXED_BATCHES}
    for case, row_slots in cases.items():
        for p in slots.named_slot_params().values():
            p.grad = torch.zeros_like(p)  # as SlotAdamW allocates them: untouched ones stay zero
        selector = row_slots[0] if len(set(row_slots)) == 1 else torch.tensor(row_slots)
        with slots.use(selector):
            outputs, padding_logits = _mcore_outputs(layers, output_weight, inputs, tp, rank)
            # padded-vocab logits in the loss too, as mcore's vocab-parallel cross entropy
            # has them: their LoRA rows must still get no gradient (the reference's are 0)
            (_loss(outputs) + _loss({"padding": padding_logits})).backward()
        results["zero_grad_violations"] += [f"{case}: {v}" for v in _zero_grad_violations(slots, row_slots)]
        grads = _gathered_grads(slots, row_slots)
        reference = _reference_grads(weights, adapters, inputs, row_slots)
        results["grad_vs_reference"][case] = _max_relative_diff(grads, reference)
        results["grads"][case] = grads
    return results


def _export_checks(slots, adapters) -> dict:
    mismatches = []
    for slot, spec in SPECS.items():
        exported = slots.export_slot(slot)
        if exported.keys() != adapters[slot].keys():
            mismatches.append(f"slot {slot}: names {sorted(exported.keys() ^ adapters[slot].keys())[:3]}")
        mismatches += [f"slot {slot}: {k}" for k in exported if not torch.equal(exported[k], adapters[slot].get(k))]
        before = {n: p[slot].clone() for n, p in slots.named_slot_params().items()}
        slots.load_slot(slot, spec, exported)
        mismatches += [f"slot {slot} reload: {n}" for n, p in slots.named_slot_params().items()
                       if not torch.equal(p[slot], before[n])]
    inits = {}
    for tag, spec in INIT_SPECS.items():
        slots.init_slot(1, spec)
        inits[tag] = slots.export_slot(1)
    slots.clear_slot(1)
    return {"export_mismatches": mismatches, "init_exports": inits,
            "tp_sharded": sorted(slots.tp_sharded_param_names()), "targets": target_module_names(SPECS[3], slots.module_shapes())}


def _broken_adapters_accepted(slots, adapter: dict[str, torch.Tensor]) -> list[str]:
    """load_slot must reject a missing tensor or a wrong shape, and leave the slot as it was."""
    problems = []
    name = next(iter(adapter))
    before = {n: p[1].clone() for n, p in slots.named_slot_params().items()}
    for what, broken in (("missing", {k: v for k, v in adapter.items() if k != name}),
                         ("wrong shape", {**adapter, name: adapter[name][:, :-1]})):
        try:
            slots.load_slot(1, SPECS[1], broken)
            problems.append(f"{what}: accepted")
        except ValueError:
            pass
    changed = [n for n, p in slots.named_slot_params().items() if not torch.equal(p[1], before[n])]
    return problems + [f"slot changed by a rejected load: {n}" for n in changed]


def _layer_checks(tp: int, rank: int) -> dict:
    weights = _hf_weights()
    layers, output_weight, slots = _build_layers(tp, rank, weights)
    adapters = {slot: random_adapter(spec, 1, seed=slot) for slot, spec in SPECS.items()}
    for slot, spec in SPECS.items():
        slots.load_slot(slot, spec, adapters[slot])
    gen = torch.Generator().manual_seed(1)
    inputs = {kind: torch.randn(SEQ, BATCH, width, generator=gen)
              for kind, width in (("hidden", HIDDEN), ("ctx", HEADS * HEAD_DIM), ("ffn", FFN))}
    results = _forward_checks(layers, output_weight, slots, weights, adapters, inputs, tp, rank)
    results.update(_grad_checks(layers, output_weight, slots, weights, adapters, inputs, tp, rank))
    results["broken_adapters_accepted"] = _broken_adapters_accepted(slots, adapters[1])
    results.update(_export_checks(slots, adapters))
    return results


# -- a tiny GPTModel -------------------------------------------------------------------


def _gpt_model(tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=HEAD_DIM, ffn_hidden_size=FFN, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, tensor_model_parallel_size=tp,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False)
    torch.manual_seed(0)
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=PADDED_VOCAB,
                    max_sequence_length=16, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


@torch.no_grad()
def _merge_into_base(model, spec: LoraSpec, adapter: dict[str, torch.Tensor], tp: int, rank: int) -> None:
    """Add the adapter's deltas to the wrapped model's base weights, in mcore's layouts."""
    for index, layer in enumerate(model.decoder.layers):
        delta = {path.rsplit(".", 1)[-1]: merged_delta(spec, adapter, path)
                 for path, _, _ in hf_modules(2) if path.startswith(f"model.layers.{index}.")}
        attention, mlp = layer.self_attention, layer.mlp
        attention.linear_qkv.base.weight += pack_qkv_rows(delta["q_proj"], delta["k_proj"],
                                                          delta["v_proj"]).chunk(tp)[rank]
        attention.linear_proj.base.weight += delta["o_proj"].chunk(tp, dim=1)[rank]
        mlp.linear_fc1.base.weight += torch.cat([delta["gate_proj"].chunk(tp)[rank],
                                                 delta["up_proj"].chunk(tp)[rank]])
        mlp.linear_fc2.base.weight += delta["down_proj"].chunk(tp, dim=1)[rank]
    model.output_layer.base.weight += pad_rows(merged_delta(spec, adapter, "lm_head"), PADDED_VOCAB).chunk(tp)[rank]


def _gpt_model_checks(tp: int, rank: int) -> dict:
    from actors.trainer.megatron.lora import wrap_gpt_model

    model = _gpt_model(tp)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, 5), generator=gen)
    positions = torch.arange(5).expand(BATCH, 5)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)[None, None]
    run = lambda: model(tokens, positions, mask)  # noqa: E731
    with torch.no_grad():
        unwrapped = run()
        slots = wrap_gpt_model(model, NUM_SLOTS, MAX_RANK, global_layer_index=lambda local: local, vocab_size=VOCAB)
        results = {"gpt_base_slot_changed": not torch.equal(_run_with(slots, BASE_SLOT, run), unwrapped)}
        slots.init_slot(1, INIT_SPECS["all_kinds"])
        results["gpt_fresh_adapter_changed"] = not torch.equal(_run_with(slots, 1, run), unwrapped)
        results["gpt_init_export"] = slots.export_slot(1)
        slots.load_slot(1, SPECS[1], random_adapter(SPECS[1], 2, seed=8))
        adapter = random_adapter(SPECS[2], 2, seed=9)
        slots.load_slot(2, SPECS[2], adapter)
        single = {slot: _run_with(slots, slot, run) for slot in (1, 2)}
        mixed = _run_with(slots, torch.tensor([2, 0, 1]), run)
        by_rows = torch.stack([single[2][0], unwrapped[1], single[1][2]])
        results["gpt_mixed_vs_single"] = float((mixed - by_rows).abs().max())
        results["gpt_lora_moves_logits"] = float((single[2] - unwrapped).abs().max())
        _merge_into_base(model, SPECS[2], adapter, tp, rank)
        results["gpt_lora_vs_merged"] = float((single[2] - _run_with(slots, BASE_SLOT, run)).abs().max())
    results["gpt_adamw_moved"] = _slot_adamw_step_changes(slots, run)
    return results


def _slot_adamw_step_changes(slots, run) -> dict[str, list[str]]:
    """One SlotAdamW step on slot 2 over named_slot_params(): which slots' tensors moved."""
    from actors.trainer.optim import SlotAdamW
    from cluster.messages import AdamParams

    params = slots.named_slot_params()
    optimizer = SlotAdamW(params, NUM_SLOTS)
    before = {name: p.detach().clone() for name, p in params.items()}
    with slots.use(2):
        run().square().mean().backward()
    optimizer.step(2, AdamParams(learning_rate=1e-2))
    return {f"slot{slot}": sorted(n for n, p in params.items() if not torch.equal(p[slot], before[n][slot]))
            for slot in range(NUM_SLOTS)}


def _run_with(slots, selector, run) -> torch.Tensor:
    with slots.use(selector):
        return run()


# -- the spawned ranks and the tests ---------------------------------------------------


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """Every TP size in turn on this one process; what it measured goes to `out_dir/rank{rank}.pt`."""
    from megatron.core import parallel_state, tensor_parallel

    torch.set_num_threads(1)  # the machine's cores are shared by the ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    # megatron-core's CUDA-only sites on this path (TP gathers, RoPE), for this test process only
    torch.cuda.current_device = lambda: torch.device("cpu")
    results = {}
    try:
        for tp in TP_SIZES:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
            try:
                # the weights are sharded by the TP rank: at dp2 x tp1 both ranks hold everything
                tp_rank = parallel_state.get_tensor_model_parallel_rank()
                results[tp] = _layer_checks(tp, tp_rank)
                results[tp].update(_gpt_model_checks(tp, tp_rank))
            finally:
                parallel_state.destroy_model_parallel()  # the next TP size needs fresh groups
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[int, list[dict]]:
    """Per TP size, each rank's measurements (at TP1, both ranks are replicas)."""
    out_dir = tmp_path_factory.mktemp("megatron-lora-ranks")
    mp.spawn(_rank_main, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return {tp: [rank_results[tp] for rank_results in per_rank] for tp in TP_SIZES}


def _ranks(measured):
    return [(tp, rank, r) for tp, ranks in measured.items() for rank, r in enumerate(ranks)]


def test_outputs_equal_merged_hf_weights_and_mixed_rows_equal_single_adapters(measured):
    for tp, rank, r in _ranks(measured):
        for case, diff in {**r["forward_vs_reference"], **r["mixed_vs_single"]}.items():
            assert diff < TOLERANCE, f"tp{tp} rank{rank} {case}: {diff}"
        assert r["padding_logits_max"] == 0.0
        assert r["untrained_modules_changed"] == []


def test_gradients_equal_reference_and_tp2_equals_tp1(measured):
    for tp, rank, r in _ranks(measured):
        for case, diff in r["grad_vs_reference"].items():
            assert diff < TOLERANCE, f"tp{tp} rank{rank} {case}: {diff}"
        assert r["zero_grad_violations"] == []
    tp1, tp2 = measured[1][0]["grads"], measured[2][0]["grads"]
    for case in tp1:
        assert tp1[case].keys() == tp2[case].keys()
        assert _max_relative_diff(tp2[case], tp1[case]) < TOLERANCE, case
    for rank_results in measured[2][1:]:  # TP ranks gather identical full gradients
        for case in tp2:
            assert all(torch.equal(rank_results["grads"][case][n], tp2[case][n]) for n in tp2[case])


def test_export_round_trips_load_rejects_mismatches_and_reports_sharding(measured):
    for tp, rank, r in _ranks(measured):
        assert r["export_mismatches"] == [], f"tp{tp} rank{rank}"
        assert r["broken_adapters_accepted"] == [], f"tp{tp} rank{rank}"
        assert r["targets"] == ["down_proj", "gate_proj", "up_proj"]
        assert set(r["tp_sharded"]) == {
            *(f"model.layers.0.self_attn.{n}.lora_B" for n in ("q_proj", "k_proj", "v_proj")),
            *(f"model.layers.0.mlp.{n}.lora_B" for n in ("gate_proj", "up_proj")),
            "model.layers.0.self_attn.o_proj.lora_A", "model.layers.0.mlp.down_proj.lora_A", "lm_head.lora_B"}


def _torch_backend_init(num_layers: int, spec: LoraSpec) -> dict[str, torch.Tensor]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=num_layers,
                         num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HEAD_DIM)
    slots = LoraSlots(Qwen3ForCausalLM(config), NUM_SLOTS, MAX_RANK)
    slots.init_slot(1, spec)
    return slots.export_slot(1)


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_init_equals_torch_backend_at_any_tp(measured):
    expected = {tag: _torch_backend_init(1, spec) for tag, spec in INIT_SPECS.items()}
    expected_gpt = _torch_backend_init(2, INIT_SPECS["all_kinds"])
    for _, _, r in _ranks(measured):
        for tag in INIT_SPECS:
            _assert_same_tensors(r["init_exports"][tag], expected[tag])
        _assert_same_tensors(r["gpt_init_export"], expected_gpt)


def test_wrapped_gpt_model(measured):
    for tp, rank, r in _ranks(measured):
        assert not r["gpt_base_slot_changed"] and not r["gpt_fresh_adapter_changed"]
        assert r["gpt_lora_moves_logits"] > 0.1
        assert r["gpt_mixed_vs_single"] < TOLERANCE, f"tp{tp} rank{rank}"
        assert r["gpt_lora_vs_merged"] < TOLERANCE, f"tp{tp} rank{rank}"
        moved = r["gpt_adamw_moved"]
        assert moved["slot0"] == moved["slot1"] == moved["slot3"] == []
        assert len(moved["slot2"]) == 2 * len(hf_modules(2))  # every A and B of the slot's adapter
