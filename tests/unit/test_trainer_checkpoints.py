"""Training-state checkpoints (save_state / load_state[_with_optimizer]) on the built-in model.

The contract: a checkpoint saved with the optimizer and loaded back -- into another
slot, into another backend instance, over an adapter of another rank -- continues
training exactly as if nothing had happened; without the optimizer it has the same
weights but fresh Adam state; a bad directory is a clear ValueError that changes nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.trainer.checkpoint_files import OPTIMIZER_FILE
from actors.trainer.torch_backend import TorchTrainerBackend
from cluster.config import ClusterConfig, ModelConfig, TrainerConfig
from cluster.messages import AdamParams, DatumBatch, LoraSpec
from launch.cluster import free_port

SPEC = LoraSpec(rank=4, alpha=8.0, seed=11)
OTHER_SPEC = LoraSpec(rank=8, alpha=16.0, train_unembed=False, seed=5)  # another rank, other targets
# weight decay and clipping on, so every part of the AdamW state matters
ADAM = AdamParams(learning_rate=2e-2, weight_decay=0.01, grad_clip_norm=1.0)
K_STEPS, M_STEPS = 2, 3


def _config(model_dir) -> ClusterConfig:
    return ClusterConfig(model=ModelConfig(path=str(model_dir), name="tiny"),
                         trainer=TrainerConfig(max_adapters=3, max_lora_rank=8))


def _batch(seed: int, lengths=(6, 9, 4)) -> DatumBatch:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 900, n + 1) for n in lengths]
    return DatumBatch(
        tokens=np.concatenate([s[:-1] for s in seqs]).astype(np.int64),
        lengths=np.array(lengths, dtype=np.int64),
        loss_inputs={"target_tokens": np.concatenate([s[1:] for s in seqs]).astype(np.int64),
                     "weights": rng.uniform(0.5, 1.5, sum(lengths)).astype(np.float32)},
    )


BATCHES = [_batch(seed) for seed in range(K_STEPS + M_STEPS)]


def _train(backend: TorchTrainerBackend, slot: int, batches: list[DatumBatch]) -> list[float]:
    losses = []
    for batch in batches:
        losses.append(backend.forward_backward(slot, "cross_entropy", {}, False, batch).metrics["loss:sum"])
        backend.optim_step(slot, ADAM)
    return losses


def _forward_loss(backend: TorchTrainerBackend, slot: int, batch: DatumBatch) -> float:
    return backend.forward_backward(slot, "cross_entropy", {}, True, batch).metrics["loss:sum"]


def _snapshot(backend: TorchTrainerBackend, slot: int) -> dict[str, torch.Tensor]:
    """Everything a slot owns: its weights and its optimizer state."""
    out = {f"w.{n}": p.detach()[slot].clone() for n, p in backend.optimizer.params.items()}
    for name in backend.optimizer.params:
        out[f"m.{name}"] = backend.optimizer.exp_avg[name][slot].clone()
        out[f"v.{name}"] = backend.optimizer.exp_avg_sq[name][slot].clone()
    out["step"] = torch.tensor(backend.optimizer.steps[slot])
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def trained(builtin_model_dir, tmp_path_factory):
    """Slot 1 trained K steps and saved (with and without the optimizer), then M more
    steps recorded: the reference every loaded copy must reproduce."""
    backend = TorchTrainerBackend(_config(builtin_model_dir))
    backend.create_adapter(1, SPEC)
    _train(backend, 1, BATCHES[:K_STEPS])
    root = tmp_path_factory.mktemp("ckpt")
    with_opt, without_opt = root / "weights" / "k2", root / "weights" / "k2-no-opt"
    saved = _snapshot(backend, 1)
    size = backend.save_state(1, with_opt, with_optimizer=True)
    backend.save_state(1, without_opt, with_optimizer=False)
    reference = _train(backend, 1, BATCHES[K_STEPS:])
    return dict(backend=backend, with_opt=with_opt, without_opt=without_opt, size=size,
                saved=saved, reference=reference, after=_snapshot(backend, 1))


def test_checkpoint_layout(trained):
    directory = trained["with_opt"]
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors", OPTIMIZER_FILE]
    assert sorted(os.listdir(trained["without_opt"])) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.name.endswith((".tmp", ".old")) for p in directory.parent.iterdir())
    assert trained["size"] == sum(f.stat().st_size for f in directory.iterdir())
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == SPEC.rank and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    state = load_file(str(directory / OPTIMIZER_FILE))
    assert int(state.pop("step")) == K_STEPS
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    assert set(state) == {f"{k}.{m}" for k in adapter for m in ("exp_avg", "exp_avg_sq")}
    for name, value in state.items():
        assert value.dtype == torch.float32
        assert value.shape == adapter[name.rsplit(".", 1)[0]].shape  # cut to the adapter's rank
    assert any(v.abs().sum() > 0 for v in state.values())


def test_load_with_optimizer_into_another_slot_continues_exactly(trained):
    backend = trained["backend"]
    backend.create_adapter(2, OTHER_SPEC)  # the slot holds an adapter of another rank
    _train(backend, 2, BATCHES[:1])  # ... with its own optimizer state
    spec = backend.load_state(2, trained["with_opt"], with_optimizer=True, seed=99)
    assert spec == LoraSpec(rank=SPEC.rank, alpha=SPEC.alpha, train_attn=True, train_mlp=True,
                            train_unembed=True, seed=99)
    assert backend.slots.specs[2] == spec
    _assert_same(_snapshot(backend, 2), trained["saved"])
    losses = _train(backend, 2, BATCHES[K_STEPS:])
    np.testing.assert_allclose(losses, trained["reference"], rtol=0, atol=1e-5)
    _assert_same(_snapshot(backend, 2), trained["after"])
    backend.drop_adapter(2)


def test_load_with_optimizer_in_a_fresh_backend_continues_exactly(trained, builtin_model_dir):
    fresh = TorchTrainerBackend(_config(builtin_model_dir))
    fresh.load_state(3, trained["with_opt"], with_optimizer=True)
    losses = _train(fresh, 3, BATCHES[K_STEPS:])
    np.testing.assert_allclose(losses, trained["reference"], rtol=0, atol=1e-5)
    assert fresh.optimizer.steps[3] == K_STEPS + M_STEPS
    _assert_same(_snapshot(fresh, 3), trained["after"])


@pytest.mark.parametrize("source", ["with_opt", "without_opt"])
def test_load_without_optimizer_keeps_weights_but_starts_adam_afresh(trained, source):
    backend = trained["backend"]
    backend.load_state(2, trained[source], with_optimizer=False)
    assert backend.optimizer.steps[2] == 0
    assert not any(backend.optimizer.exp_avg[n][2].any() for n in backend.optimizer.params)
    weights = {k: v for k, v in _snapshot(backend, 2).items() if k.startswith("w.")}
    _assert_same(weights, {k: v for k, v in trained["saved"].items() if k.startswith("w.")})
    losses = _train(backend, 2, BATCHES[K_STEPS:])
    assert losses[0] == pytest.approx(trained["reference"][0], abs=1e-5)  # same weights
    assert all(abs(a - b) > 1e-4 for a, b in zip(losses[1:], trained["reference"][1:]))  # other Adam state
    backend.drop_adapter(2)


def _corrupt(directory, tmp_path, how: str):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    if how == "truncated weights":
        path = broken / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif how == "bad json":
        (broken / "adapter_config.json").write_text("{not json")
    elif how == "no weights":
        (broken / "adapter_model.safetensors").unlink()
    elif how == "truncated optimizer":
        path = broken / OPTIMIZER_FILE
        path.write_bytes(path.read_bytes()[:-64])
    elif how == "rank too large":
        config = json.loads((broken / "adapter_config.json").read_text())
        config["r"] = 16
        (broken / "adapter_config.json").write_text(json.dumps(config))
    elif how == "rank mismatch":
        config = json.loads((broken / "adapter_config.json").read_text())
        config["r"] = 2
        (broken / "adapter_config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize("how, with_optimizer, message", [
    ("missing", False, "does not exist"),
    ("no weights", False, "incomplete: adapter_model.safetensors missing"),
    ("truncated weights", False, "unreadable"),
    ("bad json", False, "unreadable"),
    ("truncated optimizer", True, "unreadable optimizer.safetensors"),
    ("no optimizer", True, "holds no optimizer state"),
    ("rank too large", False, "exceeds this server's maximum"),
    ("rank mismatch", False, "expected a float tensor of shape"),
])
def test_bad_checkpoints_raise_value_error_and_change_nothing(trained, tmp_path, how, with_optimizer, message):
    backend = trained["backend"]
    backend.create_adapter(2, OTHER_SPEC)
    _train(backend, 2, BATCHES[:1])
    before = _snapshot(backend, 2)
    if how == "missing":
        directory = tmp_path / "nope"
    elif how == "no optimizer":
        directory = trained["without_opt"]
    else:
        directory = _corrupt(trained["with_opt"], tmp_path, how)
    with pytest.raises(ValueError, match=message) as info:
        backend.load_state(2, directory, with_optimizer=with_optimizer)
    assert str(directory) in str(info.value)
    assert backend.slots.specs[2] == OTHER_SPEC
    _assert_same(_snapshot(backend, 2), before)
    backend.drop_adapter(2)


def test_save_errors_and_out_of_range_slots(trained, tmp_path):
    backend = trained["backend"]
    with pytest.raises(ValueError, match="holds no adapter"):
        backend.save_state(2, tmp_path / "x")
    with pytest.raises(ValueError, match="out of range"):
        backend.load_state(9, trained["with_opt"], with_optimizer=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def test_save_is_atomic_and_replaces_an_old_checkpoint(builtin_model_dir, tmp_path, monkeypatch):
    import actors.trainer.checkpoint_files as checkpoint_files

    backend = TorchTrainerBackend(_config(builtin_model_dir))
    backend.create_adapter(1, SPEC)
    directory = tmp_path / "ckpt"
    (tmp_path / "ckpt.tmp").mkdir()  # debris of an earlier crash
    (tmp_path / "ckpt.tmp" / "junk").write_text("x")
    backend.save_state(1, directory)
    first = (directory / "adapter_model.safetensors").read_bytes()
    assert not (tmp_path / "ckpt.tmp").exists()

    _train(backend, 1, BATCHES[:1])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_files, "save_file", crash)  # the optimizer file fails to write
    with pytest.raises(OSError, match="disk full"):
        backend.save_state(1, directory)
    assert (directory / "adapter_model.safetensors").read_bytes() == first  # the old one is intact
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors", OPTIMIZER_FILE]
    monkeypatch.undo()

    backend.save_state(1, directory)  # overwrite: the new state replaces the old
    assert (directory / "adapter_model.safetensors").read_bytes() != first
    assert int(load_file(str(directory / OPTIMIZER_FILE))["step"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_worker_handlers_only_rank_zero_writes(trained, tmp_path, monkeypatch):
    from actors.trainer.main import TrainerWorker
    from cluster.config import ControllerConfig
    from cluster.messages import TrainerLoadStateReq, TrainerLoadStateResp, TrainerSaveStateReq

    config = _config("unused")
    config.controller = ControllerConfig(worker_address=f"tcp://127.0.0.1:{free_port()}")
    for rank in (1, 0):
        worker = TrainerWorker(config, rank=rank, world_size=1)
        monkeypatch.setattr(trained["backend"], "rank", rank)  # the backend decides who exports
        worker.backend = trained["backend"]
        try:
            directory = tmp_path / f"saved-by-{rank}"
            resp = worker._answer(TrainerSaveStateReq(slot=1, directory=str(directory)))
            assert (resp.size_bytes > 0) == (rank == 0) and directory.exists() == (rank == 0)
            resp = worker._answer(TrainerLoadStateReq(slot=2, directory=str(trained["with_opt"]),
                                                      with_optimizer=True, seed=3))
            assert isinstance(resp, TrainerLoadStateResp) and resp.lora.rank == SPEC.rank and resp.lora.seed == 3
            resp = worker._answer(TrainerLoadStateReq(slot=2, directory=str(tmp_path / "missing"),
                                                      with_optimizer=False))
            assert resp.status == 400 and "does not exist" in resp.detail
        finally:
            worker.backend = None
            worker.peer.close(linger_ms=0)
            worker.ctx.term()
    trained["backend"].drop_adapter(2)


# -- data parallelism: the ranks agree before any of them loads -------------------------


def test_a_load_another_dp_rank_rejects_changes_nothing(trained, monkeypatch):
    """Rank 0 reads a good checkpoint, but another rank could not (say the directory is
    not visible on its node): rank 0 must refuse too, before touching the slot. (The
    all-reduce itself is exercised for real by the DP test of forward_backward.)"""
    import actors.trainer.interface as interface

    backend = trained["backend"]
    backend.create_adapter(2, OTHER_SPEC)
    before = _snapshot(backend, 2)
    reduced = []

    def all_reduce_with_a_rejecting_peer(flag, op):
        reduced.append(int(flag.item()))
        flag.fill_(1)

    monkeypatch.setattr(backend, "world_size", 2)
    monkeypatch.setattr(interface.dist, "all_reduce", all_reduce_with_a_rejecting_peer)
    with pytest.raises(ValueError, match="another trainer rank rejected checkpoint"):
        backend.load_state(2, trained["with_opt"], with_optimizer=True)
    assert reduced == [0]  # this rank itself found nothing wrong
    assert backend.slots.specs[2] == OTHER_SPEC
    _assert_same(_snapshot(backend, 2), before)
    backend.drop_adapter(2)
