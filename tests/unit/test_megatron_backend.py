"""MegatronTrainerBackend gives the torch backend's results at every parallel layout.

For each model (the built-in tiny Qwen3, a Qwen2-style one with q/k/v bias and untied
embeddings, a Llama-style one, tied, with a vocabulary TP2 must pad) the torch backend
runs ten training steps in this process, one loss each (all seven Tinker losses, and
cross_entropy over top-k targets), and records what each step saw: per-token logprobs,
every loss value and metric, the full LoRA gradients, the gradient norm, and at the end
the adapter and its Adam moments. The Megatron backend then runs the same steps:

- TP1 in this process (a world of one);
- in ONE spawn of four gloo ranks (starting ranks and importing megatron-core costs
  seconds each, so the layouts share the processes and re-initialise megatron-core's
  groups): dp4, dp2 x tp2, dp2 x pp2 and tp2 x pp2. Each rank gets its DP group's shard
  exactly as the controller cuts it, and the reporting rank's outputs are compared.

Every layout also: runs two adapters with two losses in one clock cycle's pass, cut into
microbatches (each equals its adapter's own pass, gradients included),
writes a checkpoint that the torch backend loads, and loads the torch backend's
checkpoint (with its optimizer) and continues exactly as the torch backend does.
Tolerance 1e-4 (fp32), relative to each quantity's scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")

from tests.megatron_cases import llama_config, qwen2_config, save_randomized  # noqa: E402

from cluster.config import ClusterConfig, ModelConfig, TrainerConfig  # noqa: E402
from cluster.messages import AdamParams, DatumBatch, LoraSpec  # noqa: E402
from launch.cluster import free_port  # noqa: E402

SPEC = LoraSpec(rank=4, alpha=8.0, seed=11)
OTHER = LoraSpec(rank=2, alpha=2.0, train_mlp=False, seed=12)
ADAM = AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=5.0)
LENGTHS = [7, 3, 9, 5, 4, 6]
STEPS = [("cross_entropy", {}, 0), ("importance_sampling", {}, 0), ("ppo", {}, 0), ("cispo", {}, 0),
         ("dro", {"beta": 0.5}, 0), ("gspo", {}, 0), ("stable_reinforce", {}, 0), ("cross_entropy", {}, 3),
         ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}, 0), ("cross_entropy", {}, 0)]
LAYOUTS = {"dp4": (1, 1), "dp2-tp2": (2, 1), "dp2-pp2": (1, 2), "tp2-pp2": (2, 2)}
TOLERANCE = 1e-4


def _config(model_dir: str, ranks: int = 1, tp: int = 1, pp: int = 1, backend: str = "megatron") -> ClusterConfig:
    return ClusterConfig(model=ModelConfig(path=model_dir, name="tiny", max_context=64),
                         trainer=TrainerConfig(backend=backend, ranks=ranks, tp=tp, pp=pp, max_adapters=2,
                                               max_lora_rank=4))


def _batch(step: int, vocab: int) -> DatumBatch:
    loss_fn, _, top_k = STEPS[step]
    rng = np.random.default_rng(100 + step)
    total = sum(LENGTHS)
    targets = rng.integers(0, vocab, (total, top_k) if top_k else total)
    inputs = {"target_tokens": targets.astype(np.int64)}
    if loss_fn == "cross_entropy":
        inputs["weights"] = rng.uniform(0.2, 1.5, targets.shape).astype(np.float32)
    else:
        inputs["logprobs"] = rng.uniform(-9.0, -4.0, total).astype(np.float32)
        inputs["advantages"] = rng.normal(0.0, 1.0, total).astype(np.float32)
    if loss_fn == "gspo":
        inputs["sequence_ratio_mask"] = np.ones(total, dtype=np.float32)
    if loss_fn == "stable_reinforce":
        inputs["sampled_mask"] = (rng.uniform(size=total) < 0.7).astype(np.float32)
    return DatumBatch(tokens=rng.integers(0, vocab, total).astype(np.int64), lengths=np.array(LENGTHS),
                      loss_inputs=inputs)


def _full_grads(backend, slot: int) -> dict[str, np.ndarray] | None:
    """The slot's whole gradient by PEFT name (on the exporting rank)."""
    spec = backend.slots.specs[slot]
    if hasattr(backend, "gather_full_slot"):
        grads = {name: p.grad.clone() for name, p in backend.slots.named_slot_params().items()}
        if backend.dims.dp > 1:  # a DP shard's gradient is part of the batch's: sum them as optim_step will
            import torch.distributed as dist
            from megatron.core import parallel_state

            for grad in grads.values():
                dist.all_reduce(grad, group=parallel_state.get_data_parallel_group())
        return backend.gather_full_slot(slot, spec, {"": grads})
    from actors.peft import lora_tensor_names, module_kind, trains_kind

    out = {}
    for path, m in backend.slots.modules.items():
        if trains_kind(spec, module_kind(path)):
            a_name, b_name = lora_tensor_names(path)
            out[a_name] = m.lora_A.grad[slot, :spec.rank].numpy().copy()
            out[b_name] = m.lora_B.grad[slot, :, :spec.rank].numpy().copy()
    return out


def _train(backend, vocab: int, shard=lambda batch: batch) -> list[dict]:
    """Run STEPS on slot 1; what each step saw."""
    backend.create_adapter(1, SPEC)
    seen = []
    for step, (loss_fn, config, _) in enumerate(STEPS):
        result = backend.forward_backward(1, loss_fn, config, False, shard(_batch(step, vocab)))
        grads = _full_grads(backend, 1)
        metrics = backend.optim_step(1, ADAM)
        seen.append({"logprobs": result.logprobs, "loss": result.elementwise_loss, "metrics": result.metrics,
                     "grads": grads, "grad_norm": metrics["grad_norm:mean"]})
    return seen


def _scaled_diff(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max())) if want.size else 0.0


# -- the torch reference -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(builtin_model_dir, tmp_path_factory) -> dict[str, dict]:
    """name -> model dir, vocab, the torch backend's record and checkpoint (after STEPS)."""
    from actors.trainer.torch_backend import TorchTrainerBackend

    root = tmp_path_factory.mktemp("megatron-backend")
    models = {"builtin": str(builtin_model_dir), "qwen2": str(save_randomized(qwen2_config(), root / "qwen2")),
              "llama": str(save_randomized(llama_config(), root / "llama"))}
    found = {}
    for name, model_dir in models.items():
        backend = TorchTrainerBackend(_config(model_dir, backend="torch"))
        vocab = backend.vocab_size
        seen = _train(backend, vocab)
        checkpoint = root / f"{name}-torch-ckpt"
        backend.save_state(1, checkpoint)
        record = root / f"{name}.record.pt"
        final = backend.gather_slot_state(1, with_optimizer=True)
        after = backend.forward_backward(1, "cross_entropy", {}, True, _batch(0, vocab)).logprobs
        torch.save({"seen": seen, "final": final, "after": after}, record)
        found[name] = {"model": model_dir, "vocab": vocab, "record": str(record), "checkpoint": str(checkpoint)}
    return found


# -- one layout ----------------------------------------------------------------------------


def _check_layout(backend, case: dict, out_dir: Path, label: str) -> dict[str, float]:
    """Everything one layout must match; the max scaled difference of each quantity seen here."""
    from cluster.parallel import EXPORTING_RANK

    record = torch.load(case["record"], weights_only=False)
    dims, coords = backend.dims, backend.coords
    start, stop = dims.shard_bounds(len(LENGTHS))[coords.dp]
    lo, hi = int(np.sum(LENGTHS[:start])), int(np.sum(LENGTHS[:stop]))
    seen = _train(backend, case["vocab"], shard=lambda batch: batch.select(start, stop))
    reports = backend.rank == dims.reporting_rank(coords.dp)
    diffs: dict[str, float] = {}

    def note(what: str, value: float) -> None:
        diffs[what] = max(diffs.get(what, 0.0), value)

    for mine, torch_step in zip(seen, record["seen"]):
        if reports:
            note("logprobs", _scaled_diff(mine["logprobs"], torch_step["logprobs"][lo:hi]))
            note("elementwise loss", _scaled_diff(mine["loss"], torch_step["loss"][lo:hi]))
            note("loss:sum", _scaled_diff(mine["metrics"]["loss:sum"], np.sum(torch_step["loss"][lo:hi])))
        note("grad norm", _scaled_diff(mine["grad_norm"], torch_step["grad_norm"]))
        if backend.rank == EXPORTING_RANK:
            assert mine["grads"].keys() == torch_step["grads"].keys()
            note("gradients", max(_scaled_diff(mine["grads"][k], v) for k, v in torch_step["grads"].items()))
    _check_checkpoints(backend, case, record, out_dir / label, note)
    _check_mixed_adapters(backend, case, start, stop, reports, note)
    return diffs


def _check_checkpoints(backend, case, record, directory: Path, note) -> None:
    """This layout's checkpoint is the torch backend's state; the torch checkpoint resumes here."""
    from actors.trainer.checkpoint_files import read_training_state

    from cluster.parallel import EXPORTING_RANK

    size = backend.save_state(1, directory)
    final = record["final"]
    if backend.rank == EXPORTING_RANK:
        assert size > 0
        written = read_training_state(directory, True, backend.adapter_shapes)
        assert written.step == final.step == len(STEPS)
        note("final adapter", max(_scaled_diff(written.tensors[k], v) for k, v in final.tensors.items()))
        note("final moments", max(_scaled_diff(written.moments[k], v) for k, v in final.moments.items()))
    spec = backend.load_state(2, case["checkpoint"], with_optimizer=True, seed=5)
    assert (spec.rank, spec.alpha, spec.seed) == (SPEC.rank, SPEC.alpha, 5)
    loaded = backend.gather_slot_state(2, with_optimizer=True)
    if loaded is not None:  # a torch checkpoint goes in and comes out unchanged, bit for bit
        assert loaded.step == final.step and all(np.array_equal(loaded.tensors[k], v) for k, v in final.tensors.items())
        assert all(np.array_equal(loaded.moments[k], v) for k, v in final.moments.items())
    start, stop = backend.dims.shard_bounds(len(LENGTHS))[backend.coords.dp]
    lo, hi = int(np.sum(LENGTHS[:start])), int(np.sum(LENGTHS[:stop]))
    after = backend.forward_backward(2, "cross_entropy", {}, True, _batch(0, case["vocab"]).select(start, stop))
    if backend.rank == backend.dims.reporting_rank(backend.coords.dp):
        note("resumed logprobs", _scaled_diff(after.logprobs, record["after"][lo:hi]))
    backend.drop_adapter(2)


def _check_mixed_adapters(backend, case, start, stop, reports, note) -> None:
    """A clock cycle's pass holding two adapters with two losses (cut into several microbatches) gives each
    adapter what its own pass gives: logprobs, losses and gradients."""
    from cluster.messages import PassEntry

    backend.create_adapter(2, OTHER)  # B starts at 0: one step makes the slot differ from the base model
    backend.forward_backward(2, "cross_entropy", {}, False, _batch(0, case["vocab"]).select(start, stop))
    backend.optim_step(2, ADAM)
    entries = [PassEntry(slot=1, loss_fn="cross_entropy", batch=_batch(0, case["vocab"]).select(start, stop)),
               PassEntry(slot=2, loss_fn="ppo", batch=_batch(2, case["vocab"]).select(start, stop))]
    alone = []
    for entry in entries:
        (result,) = backend.forward_backward_many([entry])
        alone.append((result, _full_grads(backend, entry.slot)))
        backend.optimizer.zero_grad(entry.slot)
    budget = backend.config.trainer.max_tokens_per_pass
    backend.config.trainer.max_tokens_per_pass = 2 * max(LENGTHS)  # two rows a microbatch
    try:
        shared = backend.forward_backward_many(entries)
    finally:
        backend.config.trainer.max_tokens_per_pass = budget
    for entry, result, (solo, solo_grads) in zip(entries, shared, alone):
        grads = _full_grads(backend, entry.slot)
        if reports:
            note("mixed adapters", _scaled_diff(result.logprobs, solo.logprobs))
            note("mixed adapters", _scaled_diff(result.elementwise_loss, solo.elementwise_loss))
        if grads is not None:
            note("mixed adapters", max(_scaled_diff(grads[k], v) for k, v in solo_grads.items()))
        backend.optimizer.zero_grad(entry.slot)
    backend.drop_adapter(2)


# -- running the layouts -------------------------------------------------------------------


def _rank(rank: int, world_size: int, port: int, cases: dict, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from actors.trainer.megatron.backend import MegatronTrainerBackend
    from actors.trainer.megatron.model import destroy_model_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    try:
        for label, (tp, pp) in LAYOUTS.items():
            for name, case in cases.items():
                backend = MegatronTrainerBackend(_config(case["model"], world_size, tp, pp), rank, world_size)
                results[f"{label}/{name}"] = _check_layout(backend, case, Path(out_dir) / name, label)
                del backend
                destroy_model_parallel()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def _assert_within_tolerance(table: dict[str, dict[str, float]]) -> None:
    print(json.dumps(table, indent=1))  # the parity table (layout/model -> quantity -> max scaled difference)
    worst = {key: max(diffs.values()) for key, diffs in table.items()}
    assert all(value <= TOLERANCE for value in worst.values()), worst


def test_tp1_equals_the_torch_backend(cases, tmp_path):
    import torch.distributed as dist

    from actors.trainer.megatron.backend import MegatronTrainerBackend
    from actors.trainer.megatron.model import destroy_model_parallel

    table = {}
    try:
        for name, case in cases.items():
            backend = MegatronTrainerBackend(_config(case["model"]))
            table[f"tp1/{name}"] = _check_layout(backend, case, tmp_path / name, "tp1")
            del backend
            destroy_model_parallel()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert set(table["tp1/builtin"]) >= {"logprobs", "loss:sum", "gradients", "grad norm", "final adapter",
                                         "final moments", "resumed logprobs", "mixed adapters"}
    _assert_within_tolerance(table)


def test_four_rank_layouts_equal_the_torch_backend(cases, tmp_path):
    mp.spawn(_rank, args=(4, free_port(), cases, str(tmp_path)), nprocs=4, join=True)
    table = {}
    for rank in range(4):
        for key, diffs in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            merged = table.setdefault(key, {})
            for what, value in diffs.items():
                merged[what] = max(merged.get(what, 0.0), value)
    assert set(table) == {f"{label}/{name}" for label in LAYOUTS for name in cases}
    _assert_within_tolerance(table)


def test_a_megatron_checkpoint_resumes_on_the_torch_backend(cases, tmp_path):
    """Every layout's checkpoint holds the torch backend's state (above); here the torch
    backend actually loads one, with its optimizer, and continues where it left off."""
    import torch.distributed as dist

    from actors.trainer.megatron.backend import MegatronTrainerBackend
    from actors.trainer.megatron.model import destroy_model_parallel
    from actors.trainer.torch_backend import TorchTrainerBackend

    case = cases["llama"]
    try:
        megatron = MegatronTrainerBackend(_config(case["model"]))
        _train(megatron, case["vocab"])
        megatron.save_state(1, tmp_path / "ckpt")
        del megatron
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
    torch_backend = TorchTrainerBackend(_config(case["model"], backend="torch"))
    torch_backend.load_state(1, tmp_path / "ckpt", with_optimizer=True)
    record = torch.load(case["record"], weights_only=False)
    after = torch_backend.forward_backward(1, "cross_entropy", {}, True, _batch(0, case["vocab"])).logprobs
    assert _scaled_diff(after, record["after"]) <= TOLERANCE
    assert torch_backend.optimizer.steps[1] == len(STEPS)
