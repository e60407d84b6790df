"""A trainer rank process: one per GPU (or CPU rank), launched by torchrun; a lone rank (world size 1) is started
directly, without torchrun, and is rank 0 of 1.

    torchrun --nproc-per-node N --master-port P -m actors.trainer.main --config cluster.json
    python -m actors.trainer.main --config cluster.json

`TrainerWorker.event_loop()` is a plain recv -> compute -> reply loop on a DEALER
connected to the controller's worker ROUTER (torch never shares a thread with
asyncio). Requests are answered by `handle_<MessageName>` methods; a handler's
ValueError becomes a 400 ErrorResp, anything else a 500, and the rank keeps serving.
An error outside the handlers is fatal: the rank reports it with WorkerFailedEvent
and exits non-zero, so the controller fails futures with the cause instead of hanging.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable

from actors.omp import prefer_brief_spins

prefer_brief_spins()  # before torch loads libgomp, which reads it once

import torch
import torch.distributed as dist
import zmq

from actors.trainer.checkpoint_files import SlotState
from actors.trainer.interface import TrainerBackend
from cluster.backends import load_backend
from cluster.config import ClusterConfig
from cluster.faults import inject_fault
from cluster.messages import (
    EngineLoadAdapterReq,
    ErrorResp,
    PassOutcome,
    ShutdownEvent,
    StepOutcome,
    TrainerCreateAdapterReq,
    TrainerCreateAdapterResp,
    TrainerDropAdapterReq,
    TrainerDropAdapterResp,
    TrainerForwardBackwardReq,
    TrainerForwardBackwardResp,
    TrainerOptimStepReq,
    TrainerOptimStepResp,
    TrainerLoadStateReq,
    TrainerLoadStateResp,
    TrainerMemoryResp,
    TrainerOffloadReq,
    TrainerOnloadReq,
    TrainerPushAdapterReq,
    TrainerPushAdapterResp,
    TrainerSaveStateReq,
    TrainerSaveStateResp,
    WorkerFailedEvent,
    WorkerReadyEvent,
)
from cluster.heartbeat import Heartbeat
from cluster.process import die_with_parent, set_process_name, setup_logging
from cluster.transport import BlockingPeer, RemoteError

log = logging.getLogger(__name__)

ROLE = "trainer"
# an engine that died after the controller chose it does not answer: fail the push, not the rank
ENGINE_PUSH_TIMEOUT_MS = 60_000
FINAL_MESSAGE_LINGER_MS = 2000  # how long close() may wait for the last message to leave


class TrainerWorker:
    def __init__(self, config: ClusterConfig, rank: int = 0, world_size: int = 1,
                 local_world_size: int = 1):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.local_world_size = local_world_size
        self.ctx = zmq.Context()
        # connected before anything can fail, so even a failed model load gets reported
        self.peer = BlockingPeer(self.ctx, zmq.DEALER, config.controller.worker_address,
                                 bind=False, identity=f"trainer-{rank}".encode())
        self.engine_peers: dict[str, BlockingPeer] = {}
        self.backend: TrainerBackend | None = None
        self.heartbeat: Heartbeat | None = None
        self.handlers: dict[type, Callable[[Any], Any]] = {
            TrainerCreateAdapterReq: self.handle_TrainerCreateAdapterReq,
            TrainerDropAdapterReq: self.handle_TrainerDropAdapterReq,
            TrainerForwardBackwardReq: self.handle_TrainerForwardBackwardReq,
            TrainerOptimStepReq: self.handle_TrainerOptimStepReq,
            TrainerPushAdapterReq: self.handle_TrainerPushAdapterReq,
            TrainerSaveStateReq: self.handle_TrainerSaveStateReq,
            TrainerLoadStateReq: self.handle_TrainerLoadStateReq,
            TrainerOffloadReq: self.handle_TrainerOffloadReq,
            TrainerOnloadReq: self.handle_TrainerOnloadReq,
        }

    def start(self) -> None:
        """Join the process group, load the model, tell the controller this rank is ready."""
        if self.world_size > 1 and not dist.is_initialized():
            # a collective that waits longer than the controller would is stuck: let it raise
            dist.init_process_group(backend="nccl" if self.config.trainer.device.startswith("cuda") else "gloo",
                                    timeout=timedelta(seconds=self.config.trainer.call_timeout_s))
        backend_class = load_backend("trainer", self.config.trainer.backend)
        self.backend = backend_class(self.config, self.rank, self.world_size, self.local_world_size)
        self.peer.send(WorkerReadyEvent(role=ROLE, rank=self.rank, world_size=self.world_size,
                                        coords=self.backend.coords, info=self.backend.info()))
        # the same heartbeat as an engine's: the admin probe shows its pid, age and memory
        self.heartbeat = Heartbeat(self.ctx, self.config.controller.worker_address, ROLE, self.rank,
                                   self.config.engine.heartbeat_interval_s, self.backend.memory_stats)
        self.heartbeat.start()
        log.info("trainer rank %d/%d ready: %s backend, %s, coords %s (%s)", self.rank, self.world_size,
                 self.config.trainer.backend, self.backend.dims.describe(), self.backend.coords, self.backend.info())

    def event_loop(self) -> None:
        """Serve requests until a ShutdownEvent arrives."""
        while True:
            _, msg = self.peer.recv()
            if isinstance(msg, ShutdownEvent):
                log.info("shutdown requested")
                return
            self.peer.reply(msg, self._answer(msg))

    def _answer(self, msg: Any) -> Any:
        handler = self.handlers.get(type(msg))
        if handler is None:
            return ErrorResp(status=400, detail=f"trainer does not handle {type(msg).__name__}")
        try:
            return handler(msg)
        except ValueError as exc:
            log.info("%s rejected: %s", type(msg).__name__, exc)
            return ErrorResp(status=400, detail=str(exc))
        except RemoteError as exc:  # an engine refused the adapter: pass its verdict on
            log.error("%s failed remotely: %s", type(msg).__name__, exc)
            return ErrorResp(status=exc.status, detail=f"engine: {exc.detail}")
        except Exception as exc:
            if self.world_size > 1 and _broke_the_group(exc):
                # a peer rank died under a collective: this group is done, and only a new one can answer; no
                # reply, the failure report makes the controller wait for the group the launcher restarts
                raise GroupBroken(f"{type(msg).__name__}: a collective failed ({exc})") from exc
            log.exception("%s failed", type(msg).__name__)
            return ErrorResp(status=500, detail=f"trainer rank {self.rank}: {type(exc).__name__}: {exc}")

    def report_failure(self, error: BaseException) -> None:
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        self.peer.send(WorkerFailedEvent(role=ROLE, rank=self.rank, error=detail))

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for peer in self.engine_peers.values():
            peer.close()
        # the last message may be the failure report the controller is waiting for
        self.peer.close(linger_ms=FINAL_MESSAGE_LINGER_MS)
        self.ctx.term()
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- handlers ------------------------------------------------------------------------

    def handle_TrainerCreateAdapterReq(self, req: TrainerCreateAdapterReq) -> TrainerCreateAdapterResp:
        self.backend.create_adapter(req.slot, req.lora)
        return TrainerCreateAdapterResp()

    def handle_TrainerDropAdapterReq(self, req: TrainerDropAdapterReq) -> TrainerDropAdapterResp:
        self.backend.drop_adapter(req.slot)
        return TrainerDropAdapterResp()

    def handle_TrainerForwardBackwardReq(self, req: TrainerForwardBackwardReq) -> TrainerForwardBackwardResp:
        """One clock cycle's pass: every entry's rows in one batch (actors/trainer/cobatch.py)."""
        shared = ["TrainerForwardBackwardReq.shared"] if len(req.entries) > 1 else []  # a pass of several runs
        inject_fault(f"trainer{self.rank}", "TrainerForwardBackwardReq", *shared)
        outcomes = self.backend.forward_backward_many(req.entries)
        return TrainerForwardBackwardResp(outcomes=[
            PassOutcome(rejected=str(o)) if isinstance(o, ValueError) else PassOutcome(result=o) for o in outcomes])

    def handle_TrainerOptimStepReq(self, req: TrainerOptimStepReq) -> TrainerOptimStepResp:
        outcomes = self.backend.optim_steps(req.steps)
        return TrainerOptimStepResp(outcomes=[
            StepOutcome(rejected=str(o)) if isinstance(o, ValueError) else StepOutcome(metrics=o) for o in outcomes])

    def handle_TrainerPushAdapterReq(self, req: TrainerPushAdapterReq) -> TrainerPushAdapterResp:
        """Every rank takes part in gathering the adapter; the exporting rank writes it
        to disk and/or pushes it to the engines, the others answer size 0."""
        exported = self.backend.export_adapter(req.slot)
        if exported is None:
            return TrainerPushAdapterResp(size_bytes=0)
        spec, arrays = exported
        size_bytes = sum(a.nbytes for a in arrays.values())
        if req.save_dir:  # a sampler_weights checkpoint: the adapter alone, written atomically
            size_bytes = self.backend.write_state(req.save_dir, SlotState(spec, arrays))
        self._push_to_engines(req.engine_addresses, req.adapter_id, spec, arrays)
        return TrainerPushAdapterResp(size_bytes=size_bytes)

    def _push_to_engines(self, addresses: list[str], adapter_id: str, spec, arrays: dict) -> None:
        """Every engine gets the adapter before any reply is awaited, so they load it at the same time;
        the first refusal (or silence) is raised once every engine has answered or timed out."""
        sent = [(peer, peer.send_request(EngineLoadAdapterReq(adapter_id=adapter_id, lora=spec, tensors=arrays)))
                for peer in map(self._engine_peer, addresses)]
        failures = []
        for peer, load in sent:
            try:
                peer.wait_reply(load, timeout_ms=ENGINE_PUSH_TIMEOUT_MS)
            except (RemoteError, TimeoutError) as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def handle_TrainerSaveStateReq(self, req: TrainerSaveStateReq) -> TrainerSaveStateResp:
        """Collective: the exporting rank writes the checkpoint, the others answer size 0."""
        return TrainerSaveStateResp(size_bytes=self.backend.save_state(req.slot, req.directory,
                                                                       req.with_optimizer))

    def handle_TrainerLoadStateReq(self, req: TrainerLoadStateReq) -> TrainerLoadStateResp:
        """Every rank loads (the directory must be visible to all of them)."""
        spec = self.backend.load_state(req.slot, req.directory, req.with_optimizer, req.seed)
        return TrainerLoadStateResp(lora=spec)

    def handle_TrainerOffloadReq(self, req: TrainerOffloadReq) -> TrainerMemoryResp:
        """Colocated: base weights and optimizer state off the device (a no-op on CPU: moved=False)."""
        inject_fault(f"trainer{self.rank}", "TrainerOffloadReq")
        moved = self.backend.offload()
        return TrainerMemoryResp(moved=moved, memory=self.backend.memory_stats())

    def handle_TrainerOnloadReq(self, req: TrainerOnloadReq) -> TrainerMemoryResp:
        inject_fault(f"trainer{self.rank}", "TrainerOnloadReq")
        moved = self.backend.onload()
        return TrainerMemoryResp(moved=moved, memory=self.backend.memory_stats())

    def _engine_peer(self, address: str) -> BlockingPeer:
        if address not in self.engine_peers:
            self.engine_peers[address] = BlockingPeer(self.ctx, zmq.DEALER, address, bind=False)
        return self.engine_peers[address]


class GroupBroken(RuntimeError):
    """A collective failed because a peer rank is gone: fatal for this rank (it exits, reporting why)."""


def _broke_the_group(exc: BaseException) -> bool:
    """Whether `exc` is the process group failing (a dead or unreachable peer) rather than this step's own error."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo/transport", "Connection closed by peer", "NCCL error",
                                         "ProcessGroupNCCL", "ProcessGroupGloo"))


def _torchrun_env() -> tuple[int, int, int]:
    """(rank, world_size, local_world_size) as torchrun sets them; a lone process is 0/1/1."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return rank, world_size, local_world_size


def run_trainer_process(config: ClusterConfig) -> int:
    """Serve as one trainer rank until shutdown; return the process exit code."""
    rank, world_size, local_world_size = _torchrun_env()
    set_process_name(f"tinkerd-trainer{rank}")
    die_with_parent()
    setup_logging(f"trainer{rank}")
    if config.trainer.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    worker = TrainerWorker(config, rank, world_size, local_world_size)
    try:
        worker.start()
        worker.event_loop()
        return 0
    except Exception as exc:
        log.exception("trainer rank %d failed", rank)
        worker.report_failure(exc)
        return 1
    finally:
        worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="tinkerd trainer rank (under torchrun, or alone)")
    parser.add_argument("--config", required=True, help="ClusterConfig JSON file")
    args = parser.parse_args()
    sys.exit(run_trainer_process(ClusterConfig.load(args.config)))


if __name__ == "__main__":
    main()
