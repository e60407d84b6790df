"""An engine process: one sampling engine (the backend config.engine.backend names), serving the controller.

    python -m actors.engine.main --config cluster.json --index I

`EngineWorker.event_loop()` polls two sockets:
- a DEALER (identity `engine-I`) connected to the controller's worker ROUTER: sample
  requests, adapter loads from disk, unloads, shutdown;
- a ROUTER bound at `engine.weights_addresses[I]` (`tcp://ADDR:*`: a free port, reported
  in WorkerReadyEvent), where trainer rank 0 pushes adapters (`EngineLoadAdapterReq`),
  answered on that ROUTER to that peer.

Sample requests are queued in the backend and answered one by one as they finish.
While a batch runs, the loop polls both sockets without blocking between decode
steps, so adapter loads and new requests are taken at once; new requests join the
running batch (continuous batching). A load that finds every slot pinned by running
requests waits until one frees up.

Batch formation. Everything already received is handed to the backend before the next
step, so requests that arrive while a step runs are admitted together, in one prefill,
at the next one. When work reaches an idle engine, the loop first gathers: it keeps
taking messages while they come less than `batch_gather_quiet_ms` apart (default 0.5 ms),
for at most `batch_gather_max_ms` (default 5 ms) in all. Measured (an engine process fed
bursts of 16 requests back to back, 1 torch thread, a loaded 2-core VM): without the
gather a burst was often split, the first 1-8 requests prefilled and decoded a step
ahead of the rest (63.7 decode steps per 64-token burst on average); with it every burst
was prefilled in one admission (63.0). A lone request pays the quiet wait once (0.5 ms);
a busy engine never waits. The SDK's own pattern (one request, then the other 15 of a
burst a few to a few hundred ms later) is outside any such window: the first request's
rows decode while the rest are on their way, and the rest join together.

Once ready, a thread heartbeats to the controller (cluster/heartbeat.py), so a dead
engine is noticed within the heartbeat timeout whatever its main loop was doing.

Requests are answered by `handle_<MessageName>` methods; a ValueError becomes a 400
ErrorResp, an unknown adapter a 410, anything else a 500, and the engine keeps
serving. An error outside the handlers is fatal: the engine reports it with
WorkerFailedEvent and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from actors.engine.interface import (
    AdapterSlotsBusy, EngineBackend, EngineBusy, UnknownAdapterError, check_residency_tags,
)
from actors.engine.sglang import cpu_shims
from actors.omp import prefer_brief_spins
from cluster.backends import load_backend
from cluster.config import ClusterConfig
from cluster.faults import inject_fault
from cluster.messages import (
    EngineCancelSampleReq,
    EngineCancelSampleResp,
    EngineLoadAdapterFromDiskReq,
    EngineLoadAdapterReq,
    EngineLoadAdapterResp,
    EngineMemoryResp,
    EngineReleaseMemoryReq,
    EngineResumeMemoryReq,
    EngineSampleReq,
    EngineSampleResp,
    EngineUnloadAdapterReq,
    EngineUnloadAdapterResp,
    ErrorResp,
    ShutdownEvent,
    WorkerFailedEvent,
    WorkerReadyEvent,
)
from cluster.heartbeat import Heartbeat
from cluster.process import die_with_parent, set_process_name, setup_logging
from cluster.transport import BlockingPeer

log = logging.getLogger(__name__)

# a CPU SGLang engine's scheduler and detokenizer are spawned children that import this
# module before anything else of theirs: the shims must be in place before sglang loads
cpu_shims.install_if_requested()

ROLE = "engine"
FINAL_MESSAGE_LINGER_MS = 2000  # how long close() may wait for the last message to leave


@dataclass(frozen=True)
class _Origin:
    """Where a request came from, so its reply goes back the same way."""

    peer: BlockingPeer
    identity: bytes | None  # the sender on a ROUTER; None on the DEALER


class EngineWorker:
    def __init__(self, config: ClusterConfig, index: int):
        self.config = config
        self.index = index
        self.ctx = zmq.Context()
        # connected before anything can fail, so even a failed model load gets reported
        self.controller = BlockingPeer(self.ctx, zmq.DEALER, config.controller.worker_address,
                                       bind=False, identity=f"engine-{index}".encode())
        self.weights: BlockingPeer | None = None
        self.weights_address = ""
        self.backend: EngineBackend | None = None
        self.heartbeat: Heartbeat | None = None
        self.running = False
        self.waiting: dict[int, tuple[_Origin, EngineSampleReq]] = {}  # backend ticket -> requester
        self.deferred_loads: list[tuple[_Origin, Any]] = []
        self.handlers: dict[type, Callable[[Any, _Origin], Any]] = {
            EngineSampleReq: self.handle_EngineSampleReq,
            EngineCancelSampleReq: self.handle_EngineCancelSampleReq,
            EngineLoadAdapterReq: self.handle_EngineLoadAdapterReq,
            EngineLoadAdapterFromDiskReq: self.handle_EngineLoadAdapterFromDiskReq,
            EngineUnloadAdapterReq: self.handle_EngineUnloadAdapterReq,
            EngineReleaseMemoryReq: self.handle_EngineReleaseMemoryReq,
            EngineResumeMemoryReq: self.handle_EngineResumeMemoryReq,
            ShutdownEvent: self.handle_ShutdownEvent,
        }

    def start(self) -> None:
        """Bind the weights socket, load the model, tell the controller this engine is ready."""
        addresses = self.config.engine.weights_addresses
        if not 0 <= self.index < len(addresses):
            raise ValueError(f"engine index {self.index} has no weights address "
                             f"(engine.weights_addresses has {len(addresses)})")
        self.weights = BlockingPeer(self.ctx, zmq.ROUTER, addresses[self.index], bind=True)
        # the address actually bound: a multi-node launcher asks for `tcp://<this host>:*`, a port free here
        self.weights_address = self.weights.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = load_backend("engine", self.config.engine.backend)(self.config)
        self.controller.send(WorkerReadyEvent(role=ROLE, rank=self.index, world_size=self.config.engine.count,
                                              weights_address=self.weights_address, info=self.backend.info()))
        self.heartbeat = Heartbeat(self.ctx, self.config.controller.worker_address, ROLE, self.index,
                                   self.config.engine.heartbeat_interval_s, self.backend.memory_stats)
        self.heartbeat.start()
        log.info("engine %d ready, weights at %s (%s)", self.index, self.weights_address, self.backend.info())

    def event_loop(self) -> None:
        """Serve until a ShutdownEvent arrives."""
        poller = zmq.Poller()
        sockets = {self.controller.sock: self.controller, self.weights.sock: self.weights}
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        self.running = True
        while self.running:
            busy = self.backend.has_work()
            # idle: block until a message comes; busy: just look, then compute a step
            for sock, _ in poller.poll(0 if busy else None):
                self._drain(sockets[sock])
            if not busy and self.backend.has_work():
                self._gather(poller, sockets)
            if not self.running:
                break
            if self.backend.has_work() and self._step():
                self._retry_deferred_loads()  # finished requests may have unpinned a slot
        self._fail_requests(503, "the engine is shutting down")
        self._fail_deferred_loads(503, "the engine is shutting down")

    def _gather(self, poller: zmq.Poller, sockets: dict) -> None:
        """Work just reached an idle engine: take whatever else arrives within `batch_gather_quiet_ms` of the
        last message, for at most `batch_gather_max_ms` in all, so that a burst's first request is not
        prefilled alone."""
        quiet_ms, most_ms = self.config.engine.batch_gather_quiet_ms, self.config.engine.batch_gather_max_ms
        deadline = time.monotonic() + most_ms / 1e3
        while self.running:
            left_ms = (deadline - time.monotonic()) * 1e3
            events = poller.poll(min(quiet_ms, left_ms)) if left_ms > 0 else []
            if not events:
                return
            for sock, _ in events:
                self._drain(sockets[sock])

    def _drain(self, peer: BlockingPeer) -> None:
        """Handle every message already waiting on `peer`."""
        while self.running:
            got = peer.recv(timeout_ms=0)  # an undecodable request is answered inside
            if got is None:
                return
            identity, msg = got
            self._dispatch(msg, _Origin(peer, identity))

    def _dispatch(self, msg: Any, origin: _Origin) -> None:
        handler = self.handlers.get(type(msg))
        if handler is None:
            log.warning("engine does not handle %s", type(msg).__name__)
            if type(msg).__name__.endswith("Req"):
                self._reply(origin, msg, ErrorResp(status=400, detail=f"engine does not handle {type(msg).__name__}"))
            return
        try:
            resp = handler(msg, origin)
        except AdapterSlotsBusy:
            log.info("%s waits: every adapter slot is in use", type(msg).__name__)
            self.deferred_loads.append((origin, msg))
            return
        except Exception as exc:
            resp = _error_resp(msg, exc, self.index)
        if resp is not None:
            self._reply(origin, msg, resp)

    def _reply(self, origin: _Origin, req: Any, resp: Any) -> None:
        origin.peer.reply(req, resp, origin.identity)

    def _step(self) -> bool:
        """Run one generation step and answer the requests it finished; True if any finished."""
        try:
            done = self.backend.step()
        except Exception as exc:  # the batch is lost, the engine is not: fail its requests, go on
            log.exception("generation step failed")
            self._fail_requests(500, f"engine {self.index}: generation failed: {type(exc).__name__}: {exc}")
            return True
        for ticket, result in done:
            origin, req = self.waiting.pop(ticket)
            if isinstance(result, Exception):
                self._reply(origin, req, _error_resp(req, result, self.index))
            else:
                self._reply(origin, req, EngineSampleResp(result=result))
        return bool(done)

    def _fail_requests(self, status: int, detail: str) -> None:
        """Answer every sample request in the backend with an error and drop it."""
        for ticket in self.backend.abort_all():
            origin, req = self.waiting.pop(ticket)
            self._reply(origin, req, ErrorResp(status=status, detail=detail))

    def _fail_deferred_loads(self, status: int, detail: str) -> None:
        for origin, req in self.deferred_loads:
            self._reply(origin, req, ErrorResp(status=status, detail=detail))
        self.deferred_loads = []

    def _retry_deferred_loads(self) -> None:
        pending, self.deferred_loads = self.deferred_loads, []
        for origin, msg in pending:
            self._dispatch(msg, origin)  # re-deferred if the slots are still all pinned

    def report_failure(self, error: BaseException) -> None:
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        self.controller.send(WorkerFailedEvent(role=ROLE, rank=self.index, error=detail))

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.weights is not None:
            self.weights.close()
        # not BlockingPeer.close(): it discards unsent messages (LINGER 0), and the last
        # message may be the failure report the controller is waiting for
        self.controller.sock.close(linger=FINAL_MESSAGE_LINGER_MS)
        self.ctx.term()

    # -- handlers ------------------------------------------------------------------------

    def handle_EngineSampleReq(self, req: EngineSampleReq, origin: _Origin) -> None:
        ticket = self.backend.submit(req)
        self.waiting[ticket] = (origin, req)
        return None  # answered by _step when its samples are done

    def handle_EngineCancelSampleReq(self, req: EngineCancelSampleReq, origin: _Origin) -> EngineCancelSampleResp:
        """Stop a sample request's work; the request itself is answered with a 499 ErrorResp."""
        ticket = next((t for t, (_, sample) in self.waiting.items()
                       if req.request_id and sample.request_id == req.request_id), None)
        if ticket is None or not self.backend.abort(ticket):
            return EngineCancelSampleResp(cancelled=False)  # finished (and answered) already
        sample_origin, sample = self.waiting.pop(ticket)
        self._reply(sample_origin, sample, ErrorResp(status=499, detail="the sample was cancelled"))
        return EngineCancelSampleResp(cancelled=True)

    def handle_EngineLoadAdapterReq(self, req: EngineLoadAdapterReq, origin: _Origin) -> EngineLoadAdapterResp:
        self.backend.load_adapter(req.adapter_id, req.lora, req.tensors)
        return EngineLoadAdapterResp()

    def handle_EngineLoadAdapterFromDiskReq(self, req: EngineLoadAdapterFromDiskReq,
                                            origin: _Origin) -> EngineLoadAdapterResp:
        self.backend.load_adapter_from_disk(req.adapter_id, req.path)
        return EngineLoadAdapterResp()

    def handle_EngineUnloadAdapterReq(self, req: EngineUnloadAdapterReq, origin: _Origin) -> EngineUnloadAdapterResp:
        self.backend.unload_adapter(req.adapter_id)
        return EngineUnloadAdapterResp()

    def handle_EngineReleaseMemoryReq(self, req: EngineReleaseMemoryReq, origin: _Origin) -> EngineMemoryResp:
        tags = check_residency_tags(req.tags)
        inject_fault(f"engine{self.index}", "EngineReleaseMemoryReq", f"EngineReleaseMemoryReq.{'+'.join(tags)}")
        self.backend.release_memory(tags)
        return EngineMemoryResp(memory=self.backend.memory_stats())

    def handle_EngineResumeMemoryReq(self, req: EngineResumeMemoryReq, origin: _Origin) -> EngineMemoryResp:
        tags = check_residency_tags(req.tags)
        inject_fault(f"engine{self.index}", "EngineResumeMemoryReq", f"EngineResumeMemoryReq.{'+'.join(tags)}")
        self.backend.resume_memory(tags)
        return EngineMemoryResp(memory=self.backend.memory_stats())

    def handle_ShutdownEvent(self, event: ShutdownEvent, origin: _Origin) -> None:
        log.info("shutdown requested")
        self.running = False
        return None


def _error_resp(msg: Any, exc: Exception, index: int) -> ErrorResp | None:
    """The ErrorResp a failed handler answers with (None for one-way events)."""
    name = type(msg).__name__
    if isinstance(exc, UnknownAdapterError):
        log.info("%s: %s", name, exc)
        status, detail = 410, str(exc)
    elif isinstance(exc, EngineBusy):
        log.info("%s refused: %s", name, exc)
        status, detail = 409, f"engine {index}: {exc}"
    elif isinstance(exc, ValueError):
        log.info("%s rejected: %s", name, exc)
        status, detail = 400, str(exc)
    else:
        log.exception("%s failed", name)
        status, detail = 500, f"engine {index}: {type(exc).__name__}: {exc}"
    return ErrorResp(status=status, detail=detail) if name.endswith("Req") else None


def run_engine_process(config: ClusterConfig, index: int) -> int:
    """Serve as engine `index` until shutdown; return the process exit code."""
    set_process_name(f"tinkerd-engine{index}")
    die_with_parent()
    prefer_brief_spins()  # before the backend imports torch: libgomp reads it once, when torch loads it
    setup_logging(f"engine{index}")
    worker = EngineWorker(config, index)
    try:
        worker.start()
        worker.event_loop()
        return 0
    except Exception as exc:
        log.exception("engine %d failed", index)
        worker.report_failure(exc)
        return 1
    finally:
        if worker.backend is not None:
            worker.backend.close()
        worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="tinkerd sampling engine")
    parser.add_argument("--config", required=True, help="ClusterConfig JSON file")
    parser.add_argument("--index", type=int, required=True, help="which engine (0-based)")
    args = parser.parse_args()
    sys.exit(run_engine_process(ClusterConfig.load(args.config), args.index))


if __name__ == "__main__":
    main()
