"""Trainer rank processes for real: `python -m actors.trainer.main` and torchrun, over ZMQ.

The test plays the controller (a ROUTER the ranks connect to) and an engine's weights
socket, using the project's own transport.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import zmq

from actors.peft import read_peft_adapter
from cluster.config import ClusterConfig, ControllerConfig, ModelConfig, TrainerConfig
from cluster.messages import (
    AdamParams, DatumBatch, EngineLoadAdapterReq, EngineLoadAdapterResp, ErrorResp, LoraSpec, PassEntry, RankCoords,
    ShutdownEvent, SlotStep, TrainerCreateAdapterReq, TrainerCreateAdapterResp, TrainerForwardBackwardReq,
    TrainerOptimStepReq, TrainerPushAdapterReq, WorkerFailedEvent, WorkerHeartbeatEvent, WorkerReadyEvent,
)
from cluster.transport import BlockingPeer
from launch.cluster import free_port

TIMEOUT_MS = 60_000
_call_ids = itertools.count(1)


def _write_config(tmp_path, model_path: str, ranks: int = 1) -> tuple[str, str]:
    address = f"tcp://127.0.0.1:{free_port()}"
    config = ClusterConfig(state_dir=str(tmp_path), model=ModelConfig(path=model_path, name="tiny"),
                           controller=ControllerConfig(worker_address=address),
                           trainer=TrainerConfig(ranks=ranks, max_adapters=2, max_lora_rank=8))
    path = tmp_path / "cluster.json"
    config.save(path)
    return str(path), address


def _launch(config_path: str, ranks: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "actors.trainer.main", "--config", config_path]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(free_port()), "-m", "actors.trainer.main", "--config", config_path]
    return subprocess.Popen(cmd, env=env)


def _recv(router: BlockingPeer):
    """The next message on `router`, the trainer's heartbeats (on a socket of their own) left out."""
    while True:
        got = router.recv(TIMEOUT_MS)
        assert got is not None, "no message from the trainer in time"
        if not isinstance(got[1], WorkerHeartbeatEvent):
            return got


def _call(router: BlockingPeer, identity: bytes, req):
    req.call_id = next(_call_ids)
    router.send(req, identity)
    peer, resp = _recv(router)
    assert peer == identity and resp.call_id == req.call_id
    return resp


def _wait_ready(router: BlockingPeer, ranks: int) -> dict[int, WorkerReadyEvent]:
    ready = {}
    while len(ready) < ranks:
        peer, msg = _recv(router)
        assert isinstance(msg, WorkerReadyEvent), msg
        assert peer == f"trainer-{msg.rank}".encode() and msg.role == "trainer"
        ready[msg.rank] = msg
    return ready


def _batch(lengths: list[int], seed: int = 0) -> DatumBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 900, sum(lengths))
    targets = rng.integers(0, 900, sum(lengths))
    return DatumBatch(tokens=tokens, lengths=np.array(lengths, dtype=np.int64),
                      loss_inputs={"target_tokens": targets, "weights": np.ones(sum(lengths), np.float32)})


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_single_rank_serves_requests_and_pushes_adapters(builtin_model_dir, tmp_path, zmq_ctx):
    config_path, address = _write_config(tmp_path, str(builtin_model_dir))
    router = BlockingPeer(zmq_ctx, zmq.ROUTER, address, bind=True)
    engine_address = f"tcp://127.0.0.1:{free_port()}"
    engine = BlockingPeer(zmq_ctx, zmq.ROUTER, engine_address, bind=True)
    proc = _launch(config_path, ranks=1)
    try:
        ready = _wait_ready(router, 1)[0]
        assert ready.world_size == 1 and ready.info["vocab_size"] == 909 and ready.info["num_slots"] == 3
        me = b"trainer-0"
        spec = LoraSpec(rank=4, seed=5)

        assert isinstance(_call(router, me, TrainerCreateAdapterReq(slot=1, lora=spec)), TrainerCreateAdapterResp)
        fb = _call(router, me, _pass(1, _batch([3, 5])))
        assert fb.outcomes[0].result.logprobs.shape == (8,) and fb.outcomes[0].result.metrics["loss:sum"] > 0
        step = _call(router, me, _step(1))
        assert step.outcomes[0].metrics["grad_norm:mean"] > 0

        bad_rank = _call(router, me, TrainerCreateAdapterReq(slot=2, lora=LoraSpec(rank=3)))
        assert isinstance(bad_rank, ErrorResp) and bad_rank.status == 400 and "power of 2" in bad_rank.detail
        bad_tokens = _batch([2])
        bad_tokens.tokens = np.array([1, 10_000])
        bad_fb = _call(router, me, TrainerForwardBackwardReq(entries=[_entry(1, bad_tokens), _entry(1, _batch([2]))]))
        assert "token ids" in bad_fb.outcomes[0].rejected and bad_fb.outcomes[0].result is None
        assert not bad_fb.outcomes[1].rejected and bad_fb.outcomes[1].result.logprobs.shape == (2,)  # it still ran
        refused = _call(router, me, TrainerOptimStepReq(steps=[SlotStep(slot=2, adam=AdamParams()),
                                                               SlotStep(slot=1, adam=AdamParams(learning_rate=1e-2))]))
        assert "holds no adapter" in refused.outcomes[0].rejected and refused.outcomes[1].metrics["grad_norm:mean"] > 0

        push = TrainerPushAdapterReq(slot=1, adapter_id="run1:v1", engine_addresses=[engine_address],
                                     save_dir=str(tmp_path / "sampler"), call_id=next(_call_ids))
        router.send(push, me)
        engine_peer, load = _recv(engine)
        assert isinstance(load, EngineLoadAdapterReq) and load.adapter_id == "run1:v1" and load.lora == spec
        engine.reply(load, EngineLoadAdapterResp(), engine_peer)
        _, pushed = _recv(router)
        assert pushed.call_id == push.call_id and pushed.size_bytes > 0

        saved_spec, saved = read_peft_adapter(tmp_path / "sampler")
        assert saved_spec.rank == 4 and set(saved) == set(load.tensors)
        for name, array in load.tensors.items():
            assert array.dtype == np.float32
            np.testing.assert_array_equal(saved[name], array)

        router.send(ShutdownEvent(), me)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_failed_start_is_reported_before_exit(tmp_path, zmq_ctx):
    config_path, address = _write_config(tmp_path, str(tmp_path / "no-such-model"))
    router = BlockingPeer(zmq_ctx, zmq.ROUTER, address, bind=True)
    proc = _launch(config_path, ranks=1)
    try:
        _, msg = _recv(router)
        assert isinstance(msg, WorkerFailedEvent) and msg.rank == 0 and "no-such-model" in msg.error
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
        proc.wait()


def test_torchrun_ranks_train_in_lockstep(builtin_model_dir, tmp_path, zmq_ctx):
    config_path, address = _write_config(tmp_path, str(builtin_model_dir), ranks=2)
    router = BlockingPeer(zmq_ctx, zmq.ROUTER, address, bind=True)
    proc = _launch(config_path, ranks=2)
    try:
        ready = _wait_ready(router, 2)
        assert {r.world_size for r in ready.values()} == {2}
        assert {rank: r.coords for rank, r in ready.items()} == {0: RankCoords(dp=0), 1: RankCoords(dp=1)}
        ranks = [b"trainer-0", b"trainer-1"]
        # fan out like the controller: send to every rank, then collect every reply
        batch = _batch([4, 6, 2, 5])
        create = TrainerCreateAdapterReq(slot=1, lora=LoraSpec(rank=8, seed=9))
        replies = [_fan_out(router, ranks, [create, create])]

        # rank 1's shard is invalid: both ranks must refuse, or rank 0 would keep its gradients
        bad = batch.select(2, 4)
        bad.tokens = np.full_like(bad.tokens, 5000)
        refused = _fan_out(router, ranks, [_pass(1, batch.select(0, 2)), _pass(1, bad)])
        assert "token ids" in refused[1].outcomes[0].rejected, refused
        assert "another trainer rank" in refused[0].outcomes[0].rejected, refused

        shards = [_pass(1, batch.select(2 * r, 2 * r + 2)) for r in range(2)]
        optim = _step(1)
        push = TrainerPushAdapterReq(slot=1, adapter_id="a", save_dir=str(tmp_path / "out"))
        replies += [_fan_out(router, ranks, shards), _fan_out(router, ranks, [optim, optim]),
                    _fan_out(router, ranks, [push, push])]
        assert all(not isinstance(r, ErrorResp) for group in replies for r in group), replies
        stepped = replies[2]
        assert stepped[0].outcomes == stepped[1].outcomes  # all-reduced gradients: the same norm
        assert replies[3][0].size_bytes > 0 and replies[3][1].size_bytes == 0  # only rank 0 exports
        for identity in ranks:
            router.send(ShutdownEvent(), identity)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def _entry(slot: int, batch: DatumBatch) -> PassEntry:
    return PassEntry(slot=slot, loss_fn="cross_entropy", batch=batch)


def _pass(slot: int, batch: DatumBatch) -> TrainerForwardBackwardReq:
    return TrainerForwardBackwardReq(entries=[_entry(slot, batch)])


def _step(slot: int) -> TrainerOptimStepReq:
    return TrainerOptimStepReq(steps=[SlotStep(slot=slot, adam=AdamParams(learning_rate=1e-2))])


def _fan_out(router: BlockingPeer, identities: list[bytes], reqs: list) -> list:
    for identity, req in zip(identities, reqs):
        req.call_id = next(_call_ids)
        router.send(req, identity)
    replies = {}
    while len(replies) < len(reqs):
        peer, resp = _recv(router)
        replies[peer] = resp
    return [replies[i] for i in identities]
