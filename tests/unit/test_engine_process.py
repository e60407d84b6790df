"""The engine process for real: `python -m actors.engine.main`, over ZMQ.

The test plays the controller (a ROUTER the engine connects to) and trainer rank 0
(a DEALER that pushes adapters to the engine's weights socket), using the project's
own transport. Adapters here adapt only the unembedding, so their tensors can be
built from config.json without loading the model in the test.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zmq

from cluster.config import ClusterConfig, ControllerConfig, EngineConfig, ModelConfig
from cluster.messages import (
    EngineCancelSampleReq, EngineCancelSampleResp, EngineLoadAdapterReq, EngineLoadAdapterResp, EngineSampleReq, EngineSampleResp, EngineUnloadAdapterReq,
    EngineUnloadAdapterResp, ErrorResp, LoraSpec, SamplingParams, ShutdownEvent, WorkerFailedEvent,
    WorkerHeartbeatEvent,
    WorkerReadyEvent,
)
from cluster.transport import BlockingPeer
from launch.cluster import free_port

TIMEOUT_MS = 60_000
ENGINE = b"engine-0"
UNEMBED_ONLY = LoraSpec(rank=4, alpha=8.0, train_attn=False, train_mlp=False, train_unembed=True)
_call_ids = itertools.count(1)


def _unembed_adapter(model_dir, seed: int) -> dict[str, np.ndarray]:
    config = json.loads((model_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    rank = UNEMBED_ONLY.rank
    return {
        "base_model.model.lm_head.lora_A.weight": rng.normal(0, 0.5, (rank, config["hidden_size"])).astype(np.float32),
        "base_model.model.lm_head.lora_B.weight": rng.normal(0, 0.5, (config["vocab_size"], rank)).astype(np.float32),
    }


def _sample(adapter_id, max_tokens=8, prompt=(5, 6, 7, 8)) -> EngineSampleReq:
    return EngineSampleReq(adapter_id=adapter_id, prompt_tokens=np.array(prompt, dtype=np.int64), num_samples=2,
                           params=SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_at_eos=False))


def _send(peer: BlockingPeer, req, identity: bytes | None = None) -> int:
    req.call_id = next(_call_ids)
    peer.send(req, identity)
    return req.call_id


def _recv(peer: BlockingPeer):
    """The engine's next message, its heartbeats (on a socket of their own) left out."""
    while True:
        got = peer.recv(TIMEOUT_MS)
        assert got is not None, "no message from the engine in time"
        if not isinstance(got[1], WorkerHeartbeatEvent):
            return got


def _replies(peer: BlockingPeer, count: int) -> list:
    """The next `count` replies, in arrival order."""
    return [_recv(peer)[1] for _ in range(count)]


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _launch(model_dir, tmp_path, zmq_ctx, index: int = 0, **engine) -> tuple[subprocess.Popen, BlockingPeer, str]:
    """Start engine `index` of a one-engine cluster (2 adapter slots, `engine` config fields on top); the test
    binds the controller ROUTER."""
    worker_address = f"tcp://127.0.0.1:{free_port()}"
    weights_address = f"tcp://127.0.0.1:{free_port()}"
    config = ClusterConfig(state_dir=str(tmp_path), model=ModelConfig(path=str(model_dir), name="tiny"),
                           controller=ControllerConfig(worker_address=worker_address),
                           engine=EngineConfig(count=1, max_adapters=2, max_lora_rank=8,
                                               weights_addresses=[weights_address], **engine))
    config.save(tmp_path / "cluster.json")
    controller = BlockingPeer(zmq_ctx, zmq.ROUTER, worker_address, bind=True)
    proc = subprocess.Popen([sys.executable, "-m", "actors.engine.main", "--config", str(tmp_path / "cluster.json"),
                             "--index", str(index)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, controller, weights_address


@pytest.fixture
def engine(builtin_model_dir, tmp_path, zmq_ctx):
    """A running engine process, the test's controller ROUTER, and a trainer DEALER to its weights socket."""
    proc, controller, weights_address = _launch(builtin_model_dir, tmp_path, zmq_ctx)
    try:
        peer, ready = _recv(controller)
        assert peer == ENGINE and isinstance(ready, WorkerReadyEvent)
        assert (ready.role, ready.rank, ready.world_size) == ("engine", 0, 1)
        assert ready.weights_address == weights_address and ready.info["num_slots"] == 3
        trainer = BlockingPeer(zmq_ctx, zmq.DEALER, weights_address, bind=False)
        yield proc, controller, trainer
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_serves_samples_adapters_and_shuts_down(engine, builtin_model_dir):
    proc, controller, trainer = engine
    pushed = trainer.call(EngineLoadAdapterReq(adapter_id="a", lora=UNEMBED_ONLY,
                                               tensors=_unembed_adapter(builtin_model_dir, seed=1)))
    assert isinstance(pushed, EngineLoadAdapterResp)

    base_id = _send(controller, _sample(None), ENGINE)
    adapted_id = _send(controller, _sample("a"), ENGINE)
    replies = {r.call_id: r for r in _replies(controller, 2)}
    assert set(replies) == {base_id, adapted_id}
    base, adapted = replies[base_id], replies[adapted_id]
    assert isinstance(base, EngineSampleResp) and isinstance(adapted, EngineSampleResp)
    for resp in (base, adapted):
        assert [len(s.tokens) for s in resp.result.sequences] == [8, 8]
        assert all(s.stop_reason == "length" for s in resp.result.sequences)
    assert base.result.sequences[0].tokens.tolist() != adapted.result.sequences[0].tokens.tolist()

    unknown_id = _send(controller, _sample("never-loaded"), ENGINE)
    (unknown,) = _replies(controller, 1)
    assert unknown.call_id == unknown_id and isinstance(unknown, ErrorResp)
    assert unknown.status == 410 and "never-loaded" in unknown.detail

    bad = _sample(None)
    bad.prompt_tokens = np.array([1, 10_000_000], dtype=np.int64)
    _send(controller, bad, ENGINE)
    (rejected,) = _replies(controller, 1)
    assert isinstance(rejected, ErrorResp) and rejected.status == 400

    _send(controller, EngineUnloadAdapterReq(adapter_id="a"), ENGINE)
    assert isinstance(_replies(controller, 1)[0], EngineUnloadAdapterResp)
    _send(controller, _sample("a"), ENGINE)
    assert _replies(controller, 1)[0].status == 410

    # a cancelled sample is answered with a 499 at once, long before its 3000 tokens
    long = _sample(None, max_tokens=3000)
    long.request_id = "req-long"
    long_id = _send(controller, long, ENGINE)
    cancel_id = _send(controller, EngineCancelSampleReq(request_id="req-long"), ENGINE)
    replies = {r.call_id: r for r in _replies(controller, 2)}
    assert isinstance(replies[long_id], ErrorResp) and replies[long_id].status == 499
    assert replies[cancel_id] == EngineCancelSampleResp(call_id=cancel_id, cancelled=True)
    _send(controller, EngineCancelSampleReq(request_id="req-long"), ENGINE)
    assert _replies(controller, 1)[0].cancelled is False

    controller.send(ShutdownEvent(), ENGINE)
    assert proc.wait(timeout=30) == 0


def test_loads_are_served_between_decode_steps_or_wait_for_a_free_slot(engine, builtin_model_dir):
    proc, controller, trainer = engine
    for adapter_id, seed in (("a", 1), ("b", 2)):
        trainer.call(EngineLoadAdapterReq(adapter_id=adapter_id, lora=UNEMBED_ONLY,
                                          tensors=_unembed_adapter(builtin_model_dir, seed)))

    # a long sample pins "a"; a load that can evict the idle "b" is answered while it runs (the load comes on
    # the other socket, which the engine may read first: the probe's reply says the sample is in)
    long_id = _send(controller, _sample("a", max_tokens=700), ENGINE)
    probe = _send(controller, EngineCancelSampleReq(request_id="none such"), ENGINE)
    assert _replies(controller, 1)[0] == EngineCancelSampleResp(call_id=probe, cancelled=False)
    c = EngineLoadAdapterReq(adapter_id="c", lora=UNEMBED_ONLY, tensors=_unembed_adapter(builtin_model_dir, 3))
    assert isinstance(trainer.call(c), EngineLoadAdapterResp)
    _send(controller, _sample("b", max_tokens=2), ENGINE)  # "b" was evicted to make room for "c"
    first = _replies(controller, 1)[0]
    assert isinstance(first, ErrorResp) and first.status == 410

    # now "a" and "c" are both in use: a new adapter has to wait for one to finish
    short_id = _send(controller, _sample("c", max_tokens=200), ENGINE)
    # the load comes on another socket, which the engine may read first; a reply on the
    # controller's socket (ordered after the sample) says the sample is in and pins "c"
    probe = _send(controller, EngineCancelSampleReq(request_id="none such"), ENGINE)
    assert _replies(controller, 1)[0] == EngineCancelSampleResp(call_id=probe, cancelled=False)
    _send(trainer, EngineLoadAdapterReq(adapter_id="d", lora=UNEMBED_ONLY,
                                        tensors=_unembed_adapter(builtin_model_dir, 4)))
    assert trainer.recv(timeout_ms=200) is None, "the load should wait while every slot is in use"
    assert _replies(controller, 1)[0].call_id == short_id
    _, loaded = _recv(trainer)
    assert isinstance(loaded, EngineLoadAdapterResp)
    done = _replies(controller, 1)[0]
    assert done.call_id == long_id and len(done.result.sequences[0].tokens) == 700

    controller.send(ShutdownEvent(), ENGINE)
    assert proc.wait(timeout=30) == 0


def _heartbeat(peer: BlockingPeer) -> WorkerHeartbeatEvent:
    while True:
        got = peer.recv(TIMEOUT_MS)
        assert got is not None, "no heartbeat from the engine in time"
        if isinstance(got[1], WorkerHeartbeatEvent):
            return got[1]


def test_a_burst_reaching_an_idle_engine_is_prefilled_in_one_forward(builtin_model_dir, tmp_path, zmq_ctx):
    # a gather window much longer than sending the burst takes, so that not even a loaded machine splits it
    proc, controller, _ = _launch(builtin_model_dir, tmp_path, zmq_ctx, batch_gather_quiet_ms=200.0,
                                  batch_gather_max_ms=2000.0)
    try:
        assert isinstance(_recv(controller)[1], WorkerReadyEvent)
        sent = {_send(controller, _sample(None, prompt=(5 + i, 6, 7)), ENGINE) for i in range(4)}
        assert {reply.call_id for reply in _replies(controller, 4)} == sent
        while _heartbeat(controller).memory.get("prefill_tokens") != 12:
            pass
        stats = _heartbeat(controller).memory  # a whole beat later: both counters read after the burst
        assert stats["prefill_forwards"] == 1 and stats["decode_steps"] == 7  # 8 tokens: 1 from the prefill
        controller.send(ShutdownEvent(), ENGINE)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_fatal_start_error_is_reported_before_exiting(builtin_model_dir, tmp_path, zmq_ctx):
    proc, controller, _ = _launch(builtin_model_dir, tmp_path, zmq_ctx, index=1)  # no weights address for 1
    try:
        peer, failed = _recv(controller)
        assert peer == b"engine-1" and isinstance(failed, WorkerFailedEvent)
        assert failed.role == "engine" and failed.rank == 1 and "no weights address" in failed.error
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
