"""TorchTrainerBackend on the built-in model: logprobs, gradients, training, data parallelism."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from actors.model_loading import SMALL_PASS_TOKENS
from actors.trainer.torch_backend import TorchTrainerBackend
from cluster.config import ClusterConfig, ModelConfig, TrainerConfig
from cluster.messages import AdamParams, DatumBatch, LoraSpec
from tests.numerics import assert_close_at_scale
from launch.cluster import free_port

SLOT = 1
SPEC = LoraSpec(rank=8, alpha=16.0, seed=1234)
ADAM = AdamParams(learning_rate=1e-2)


def _config(model_dir) -> ClusterConfig:
    return ClusterConfig(model=ModelConfig(path=str(model_dir), name="tiny"),
                         trainer=TrainerConfig(max_adapters=3, max_lora_rank=8))


def _datums(lengths: list[int], seed: int = 0, top_k: int = 0) -> list[dict[str, np.ndarray]]:
    """Datums as the SDK shapes them: targets are the inputs shifted by one."""
    rng = np.random.default_rng(seed)
    datums = []
    for n in lengths:
        seq = rng.integers(0, 900, n + 1)
        targets = seq[1:]
        if top_k:  # the true next token plus k-1 other candidates
            targets = np.stack([seq[1:], *rng.integers(0, 900, (top_k - 1, n))], axis=1)
        datums.append({"tokens": seq[:-1], "target_tokens": targets,
                       "weights": rng.uniform(-1.0, 2.0, targets.shape).astype(np.float32)})
    return datums


def _batch(datums: list[dict[str, np.ndarray]]) -> DatumBatch:
    """A DatumBatch as it arrives off the wire (read-only arrays)."""
    def frozen(a):
        a = np.ascontiguousarray(a)
        a.setflags(write=False)
        return a
    return DatumBatch(
        tokens=frozen(np.concatenate([d["tokens"] for d in datums]).astype(np.int64)),
        lengths=frozen(np.array([len(d["tokens"]) for d in datums], dtype=np.int64)),
        loss_inputs={k: frozen(np.concatenate([d[k] for d in datums])) for k in ("target_tokens", "weights")},
    )


def _nudge_adapter(backend: TorchTrainerBackend, slot: int) -> None:
    """A fresh adapter has B = 0 (output = base); give it nonzero B so the slot matters."""
    spec, arrays = backend.export_adapter(slot)
    tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
    gen = torch.Generator().manual_seed(7)
    for name, t in tensors.items():
        if "lora_B" in name:
            t.copy_(0.05 * torch.randn(t.shape, generator=gen))
    backend.slots.load_slot(slot, spec, tensors)


@pytest.fixture
def backend(builtin_model_dir) -> TorchTrainerBackend:
    backend = TorchTrainerBackend(_config(builtin_model_dir))
    backend.create_adapter(SLOT, SPEC)
    return backend


def _reference_one_by_one(backend, datums):
    """Each datum alone through the model: logprobs, and the gradient of the summed loss."""
    logprobs = []
    for d in datums:
        with backend.slots.use(SLOT):
            logits = backend.model(input_ids=torch.tensor(d["tokens"])[None]).logits[0]
        targets = torch.tensor(d["target_tokens"])
        logp = logits.float().log_softmax(-1)
        target_logp = logp.gather(1, targets.reshape(len(targets), -1)).reshape(targets.shape)
        (-torch.tensor(d["weights"]) * target_logp).sum().backward()
        logprobs.append(target_logp.detach())
    grads = {name: p.grad.clone() for name, p in backend.optimizer.params.items()}
    for p in backend.optimizer.params.values():
        p.grad.zero_()
    return logprobs, grads


@pytest.mark.parametrize("lengths", [[5, 11, 2, 8], [6, 6, 6]], ids=["padded", "one-length"])
@pytest.mark.parametrize("top_k", [0, 3])
def test_padded_batch_matches_each_datum_alone(backend, top_k, lengths):
    """Ragged rows run padded with a mask; rows of one length run without either (torch_backend.padded_batch)."""
    _nudge_adapter(backend, SLOT)
    datums = _datums(lengths, top_k=top_k)
    expected_logprobs, expected_grads = _reference_one_by_one(backend, datums)

    result = backend.forward_backward(SLOT, "cross_entropy", {}, False, _batch(datums))

    offsets = np.concatenate([[0], np.cumsum(result.lengths)])
    assert result.logprobs.dtype == np.float32
    assert result.logprobs.shape == _batch(datums).loss_inputs["target_tokens"].shape
    for i, expected in enumerate(expected_logprobs):
        datum_logprobs = result.logprobs[offsets[i]:offsets[i + 1]]
        np.testing.assert_allclose(datum_logprobs, expected.numpy(), rtol=1e-5, atol=1e-5)
    weights = _batch(datums).loss_inputs["weights"]
    np.testing.assert_allclose(result.elementwise_loss, -weights * result.logprobs, rtol=1e-6, atol=1e-6)
    assert result.metrics["loss:sum"] == pytest.approx(float(result.elementwise_loss.sum()), rel=1e-5)
    for name, p in backend.optimizer.params.items():
        assert_close_at_scale(p.grad, expected_grads[name], msg=name)


def test_small_passes_compute_on_one_thread_and_large_ones_on_all(backend):
    """actors/model_loading.compute_threads: one thread below SMALL_PASS_TOKENS padded tokens, the rank's
    threads from there on, and the thread count as it was after either."""
    backend.cpu_threads = 2
    seen = []
    hook = backend.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        for lengths in ([8], [SMALL_PASS_TOKENS // 4] * 4):
            backend.forward_backward(SLOT, "cross_entropy", {}, False, _batch(_datums(lengths)))
            assert torch.get_num_threads() == before
    finally:
        hook.remove()
    assert seen == [1, 2]


def test_forward_only_accumulates_nothing_and_backward_accumulates(backend):
    _nudge_adapter(backend, SLOT)
    batch = _batch(_datums([4, 6]))
    backend.forward_backward(SLOT, "cross_entropy", {}, True, batch)
    assert not any(p.grad.any() for p in backend.optimizer.params.values())
    backend.forward_backward(SLOT, "cross_entropy", {}, False, batch)
    once = {n: p.grad.clone() for n, p in backend.optimizer.params.items()}
    backend.forward_backward(SLOT, "cross_entropy", {}, False, batch)
    for n, p in backend.optimizer.params.items():
        torch.testing.assert_close(p.grad, 2 * once[n])


def test_repeated_steps_on_one_batch_reduce_the_loss(backend):
    datums = _datums([12, 9], seed=3)
    for d in datums:
        d["weights"] = np.ones_like(d["weights"])
    batch = _batch(datums)
    losses = []
    for _ in range(8):
        losses.append(backend.forward_backward(SLOT, "cross_entropy", {}, False, batch).metrics["loss:sum"])
        metrics = backend.optim_step(SLOT, ADAM)
        assert metrics["grad_norm:mean"] > 0
    assert losses[-1] < 0.5 * losses[0], losses


def test_policy_loss_on_the_samplers_own_logprobs(backend):
    """With q = the model's own logprobs the PPO ratio is 1, so loss = -sum(A)."""
    _nudge_adapter(backend, SLOT)
    batch = _batch(_datums([6, 4]))
    own = backend.forward_backward(SLOT, "cross_entropy", {}, True, batch).logprobs
    advantages = np.random.default_rng(1).normal(size=own.shape).astype(np.float32)
    batch.loss_inputs = {"target_tokens": batch.loss_inputs["target_tokens"], "logprobs": own,
                         "advantages": advantages}
    result = backend.forward_backward(SLOT, "ppo", {"clip_low_threshold": 0.9}, False, batch)
    assert result.metrics["loss:sum"] == pytest.approx(-float(advantages.sum()), rel=1e-4, abs=1e-4)
    np.testing.assert_allclose(result.logprobs, own, rtol=1e-6, atol=1e-6)
    assert any(p.grad.any() for p in backend.optimizer.params.values())


def test_empty_shard_returns_empty_result(backend):
    empty = DatumBatch(tokens=np.zeros(0, np.int64), lengths=np.zeros(0, np.int64),
                       loss_inputs={"target_tokens": np.zeros((0, 4), np.int64),
                                    "weights": np.zeros((0, 4), np.float32)})
    result = backend.forward_backward(SLOT, "cross_entropy", {}, False, empty)
    assert result.logprobs.shape == (0, 4) and result.elementwise_loss.shape == (0, 4)
    assert result.metrics == {"loss:sum": 0.0} and len(result.lengths) == 0


def _bad(batch: DatumBatch, **changes) -> DatumBatch:
    fields = dict(tokens=batch.tokens, lengths=batch.lengths, loss_inputs=dict(batch.loss_inputs))
    fields["loss_inputs"].update(changes.pop("loss_inputs", {}))
    fields.update(changes)
    return DatumBatch(**fields)


@pytest.mark.parametrize("slot, loss_fn, change, message", [
    (SLOT, "cross_entropy", dict(tokens=np.array([1, 2, 5000, 4, 5])), "outside \\[0, 909\\)"),
    (SLOT, "cross_entropy", dict(loss_inputs={"target_tokens": np.array([1, 2, 3, 4, -1])}), "outside"),
    (SLOT, "cross_entropy", dict(loss_inputs={"weights": np.ones(4, np.float32)}), "first dimension"),
    (SLOT, "cross_entropy", dict(loss_inputs={"weights": np.ones((5, 2), np.float32)}), "shape"),
    (SLOT, "cross_entropy", dict(lengths=np.array([2, 2])), "sum to 4"),
    (SLOT, "cross_entropy", dict(lengths=np.array([5, 0])), "at least one"),
    (SLOT, "ppo_typo", {}, "supported: .*cross_entropy"),
    (2, "cross_entropy", {}, "holds no adapter"),
    (9, "cross_entropy", {}, "out of range"),
])
def test_invalid_requests_raise_value_error(backend, slot, loss_fn, change, message):
    batch = _bad(_batch(_datums([2, 3])), **change)
    with pytest.raises(ValueError, match=message):
        backend.forward_backward(slot, loss_fn, {}, False, batch)
    assert not any(p.grad.any() for p in backend.optimizer.params.values())


def test_loss_config_errors_are_raised_before_compute(backend):
    with pytest.raises(ValueError, match="not used by cross_entropy"):
        backend.forward_backward(SLOT, "cross_entropy", {"beta": 0.1}, False, _batch(_datums([2, 3])))
    top_k_targets = _batch(_datums([2, 3], top_k=2))
    top_k_targets.loss_inputs["weights"] = np.ones(5, np.float32)  # [N] weights for [N, K] targets
    with pytest.raises(ValueError, match="shape"):
        backend.forward_backward(SLOT, "cross_entropy", {}, False, top_k_targets)


def test_export_adapter_uses_peft_names(backend):
    spec, tensors = backend.export_adapter(SLOT)
    assert spec == SPEC
    assert "base_model.model.lm_head.lora_A.weight" in tensors
    q_proj_b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert q_proj_b.shape == (4 * 64, 8)  # [heads * head_dim, rank]
    backend.drop_adapter(SLOT)
    with pytest.raises(ValueError, match="holds no adapter"):
        backend.export_adapter(SLOT)


# -- data parallelism ------------------------------------------------------------------

DP_LENGTHS = [7, 3, 10, 5]
DP_STEPS = 3


def _train(backend: TorchTrainerBackend, batch: DatumBatch) -> tuple[list[float], dict[str, torch.Tensor]]:
    backend.create_adapter(SLOT, SPEC)
    losses = []
    for _ in range(DP_STEPS):
        losses.append(backend.forward_backward(SLOT, "cross_entropy", {}, False, batch).metrics["loss:sum"])
        backend.optim_step(SLOT, ADAM)
    return losses, backend.slots.export_slot(SLOT)  # this rank's own copy (export_adapter is rank 0's)


def _dp_rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = _config(model_dir)
        config.trainer.ranks = world_size
        backend = TorchTrainerBackend(config, rank, world_size, local_world_size=world_size)
        per_rank = len(DP_LENGTHS) // world_size
        shard = _batch(_datums(DP_LENGTHS)).select(rank * per_rank, (rank + 1) * per_rank)
        losses, adapter = _train(backend, shard)
        torch.save({"losses": losses, "adapter": adapter}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_dp_ranks_match_one_rank_with_all_datums(builtin_model_dir, tmp_path):
    mp.spawn(_dp_rank, args=(2, free_port(), str(builtin_model_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    single = TorchTrainerBackend(_config(builtin_model_dir))
    single_losses, single_adapter = _train(single, _batch(_datums(DP_LENGTHS)))

    shard_sums = [a + b for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    np.testing.assert_allclose(shard_sums, single_losses, rtol=1e-5)
    assert single_losses[-1] < single_losses[0]
    for name, expected in single_adapter.items():
        torch.testing.assert_close(ranks[0]["adapter"][name], ranks[1]["adapter"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["adapter"][name], expected, rtol=0, atol=1e-5)
