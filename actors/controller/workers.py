"""The controller's side of the trainer ranks and engines: one ROUTER, two groups.

Trainer ranks act as one: every training step is a fan-out to all of them and a
barrier on all replies, each reply within the trainer timeout. Their layout is a
ParallelDims (cluster/parallel.py): each rank says where it sits when it says hello, and
the pool refuses a rank whose coordinates disagree with the layout. Engines act alone:
each sample goes to the least busy live one.

A trainer rank that reports a failure poisons the pool, and so does one that does not
answer in time (a hung collective leaves the ranks out of step): every later call fails
fast with the cause instead of hanging. So does an engine that fails before it was ever
ready. An engine that dies later is one engine down, not the cluster: it heartbeats
(WorkerHeartbeatEvent, from a thread of its own) and is declared dead when a heartbeat
is `heartbeat_timeout_s` late, when it reports a failure, or when it says hello again
(the launcher restarted it). Its calls in flight then fail with EngineDied, which the
sampling service re-queues on another live engine; it is taken back when it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq
import zmq.asyncio

from cluster.messages import WorkerFailedEvent, WorkerHeartbeatEvent, WorkerReadyEvent
from cluster.parallel import ParallelDims
from cluster.transport import AsyncPeer

log = logging.getLogger(__name__)


class WorkerFailure(RuntimeError):
    pass


@dataclass(frozen=True)
class Heartbeat:
    at: float  # monotonic
    pid: int
    host: str
    memory: dict[str, float]


class EngineDied(WorkerFailure):
    """The engine a call went to died before it answered (the call may be tried on another)."""


@dataclass
class EngineHandle:
    index: int
    identity: bytes
    weights_address: str
    in_flight: int = 0
    alive: bool = True
    last_heartbeat: float = field(default_factory=time.monotonic)
    pid: int = 0
    host: str = ""
    memory: dict[str, float] = field(default_factory=dict)
    death: str = ""  # why it was declared dead
    info: dict[str, Any] = field(default_factory=dict)  # what it said about itself when ready


class WorkerPool:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, dims: ParallelDims, engines: int,
                 trainer_timeout_s: float | None = None, heartbeat_timeout_s: float = 10.0):
        self.peer = AsyncPeer(ctx, zmq.ROUTER, address, bind=True)
        self.dims = dims
        self.expected_trainers = dims.world_size
        self.trainer_timeout_s = trainer_timeout_s
        self.expected_engines = engines
        self.trainers: dict[int, bytes] = {}
        self.engines: dict[int, EngineHandle] = {}
        self.trainer_info: dict[str, Any] = {}
        self.trainer_beats: dict[int, Heartbeat] = {}  # rank -> its latest heartbeat
        self.ready = asyncio.Event()
        self.failure: str | None = None
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.engine_restarts = 0
        self.on_engine_ready: Callable[[EngineHandle], None] = lambda engine: None  # after a restart too
        self._watchdog: asyncio.Task | None = None

    def start(self) -> None:
        self.peer.start(self._on_message)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_engines())

    async def _watch_engines(self) -> None:
        """Declare dead every engine whose heartbeat is late (checked a few times per timeout)."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_timeout_s / 4))
            deadline = time.monotonic() - self.heartbeat_timeout_s
            for engine in [e for e in self.engines.values() if e.alive and e.last_heartbeat < deadline]:
                self._engine_died(engine, f"no heartbeat for {self.heartbeat_timeout_s:g} s")

    def _on_message(self, peer: bytes, msg: Any) -> None:
        handler = getattr(self, f"handle_{type(msg).__name__}", None)
        if handler is None:
            log.warning("worker %r sent unexpected %s", peer, type(msg).__name__)
            return
        handler(peer, msg)

    def handle_WorkerReadyEvent(self, peer: bytes, msg: WorkerReadyEvent) -> None:
        log.info("%s %d/%d ready", msg.role, msg.rank, msg.world_size)
        if msg.role == "trainer":
            expected = self.dims.coords(msg.rank) if 0 <= msg.rank < self.dims.world_size else None
            if msg.coords != expected:
                self.failure = (f"trainer {msg.rank} reports coordinates {msg.coords}, but the layout "
                                f"{self.dims.describe()} puts it at {expected}")
                log.error("%s", self.failure)
                return
            self.trainers[msg.rank] = peer
            if msg.rank == 0:
                self.trainer_info = dict(msg.info)
        elif msg.role == "engine":
            previous = self.engines.get(msg.rank)
            if previous is not None:  # restarted: whatever the old one was computing is lost
                if previous.alive:
                    self._engine_died(previous, "it started again")
                self.engine_restarts += 1
            self.engines[msg.rank] = EngineHandle(msg.rank, peer, msg.weights_address, info=dict(msg.info))
            self.on_engine_ready(self.engines[msg.rank])
        if len(self.trainers) == self.expected_trainers and len(self.engines) == self.expected_engines:
            self.ready.set()

    def handle_WorkerHeartbeatEvent(self, peer: bytes, msg: WorkerHeartbeatEvent) -> None:
        if msg.role == "trainer":
            self.trainer_beats[msg.rank] = Heartbeat(time.monotonic(), msg.pid, msg.host, dict(msg.memory))
            return
        engine = self.engines.get(msg.rank) if msg.role == "engine" else None
        if engine is not None and engine.alive:
            engine.last_heartbeat, engine.pid, engine.memory = time.monotonic(), msg.pid, dict(msg.memory)
            engine.host = msg.host

    def handle_WorkerFailedEvent(self, peer: bytes, msg: WorkerFailedEvent) -> None:
        engine = self.engines.get(msg.rank) if msg.role == "engine" else None
        if engine is not None:  # it was ready once: an engine down, not the cluster
            self._engine_died(engine, f"it failed: {msg.error}")
            return
        self.failure = f"{msg.role} {msg.rank} failed: {msg.error}"
        log.error("%s", self.failure)
        self.peer.fail_pending(peer, WorkerFailure(self.failure))

    def _engine_died(self, engine: EngineHandle, why: str) -> None:
        engine.alive, engine.death = False, f"engine {engine.index} died ({why})"
        log.error("%s; its calls in flight fail, and the launcher restarts it", engine.death)
        self.peer.fail_pending(engine.identity, EngineDied(engine.death))

    def describe(self) -> dict[str, str]:
        states = {f"trainer{r}": "ready" for r in self.trainers}
        states.update({f"engine{i}": "ready" if e.alive else "dead (restarting)" for i, e in self.engines.items()})
        for r in range(self.expected_trainers):
            states.setdefault(f"trainer{r}", "starting")
        for i in range(self.expected_engines):
            states.setdefault(f"engine{i}", "starting")
        return states

    def _check_alive(self) -> None:
        if self.failure:
            raise WorkerFailure(self.failure)

    # -- trainers -----------------------------------------------------------------------

    async def trainer_fan_out(self, reqs: list[Any]) -> list[Any]:
        """reqs[r] goes to trainer rank r; returns the replies in rank order.

        A rank's error reply fails the call at once. A rank that does not answer within
        the trainer timeout poisons the pool: the other ranks may be waiting for it in a
        collective, so no later step could be trusted either.
        """
        self._check_alive()
        peers = [self.trainers[r] for r in range(self.expected_trainers)]
        calls = [asyncio.ensure_future(self.peer.call(p, r, self.trainer_timeout_s)) for p, r in zip(peers, reqs)]
        try:
            return list(await asyncio.gather(*calls))
        except TimeoutError:
            await asyncio.wait(calls)  # they share one deadline: the others are done or late now
            late = [rank for rank, c in enumerate(calls) if isinstance(c.exception(), TimeoutError)]
            self.failure = (f"trainer rank(s) {late} did not answer {type(reqs[0]).__name__} within "
                            f"{self.trainer_timeout_s:g} s (a hung collective or a lost message; see the "
                            f"trainer logs); the trainer ranks are out of step, so tinkerd must be restarted")
            log.error("%s", self.failure)
            raise WorkerFailure(self.failure) from None
        finally:
            for call in calls:  # the replies still due after an early error are not awaited by anyone
                call.add_done_callback(_consume_exception)

    def reporting_replies(self, replies: list[Any]) -> list[Any]:
        """The replies that speak for each DP group, in DP order (ParallelDims.reporting_rank)."""
        return [replies[self.dims.reporting_rank(dp)] for dp in range(self.dims.dp)]

    async def trainer_broadcast(self, make_req: Callable[[], Any]) -> list[Any]:
        return await self.trainer_fan_out([make_req() for _ in range(self.expected_trainers)])

    # -- engines ------------------------------------------------------------------------

    @property
    def live_engines(self) -> list[EngineHandle]:
        return [self.engines[i] for i in sorted(self.engines) if self.engines[i].alive]

    @property
    def engine_unsupported(self) -> dict[str, str]:
        """Sampling options some engine cannot honour -> why (engines of one cluster run one backend)."""
        merged: dict[str, str] = {}
        for engine in self.engines.values():
            merged.update(engine.info.get("unsupported", {}))
        return merged

    @property
    def engine_weights_addresses(self) -> list[str]:
        return [e.weights_address for e in self.live_engines]

    def least_busy_engine(self, avoid: EngineHandle | None = None) -> EngineHandle:
        """The live engine with the fewest calls in flight (other than `avoid`, if there is another)."""
        self._check_alive()
        live = self.live_engines
        if not live:
            deaths = "; ".join(e.death for e in self.engines.values()) or "none has started"
            raise WorkerFailure(f"no sampling engine is alive: {deaths}; the launcher restarts dead engines, so "
                                f"retry in a while")
        others = [e for e in live if e is not avoid] or live
        return min(others, key=lambda e: (e.in_flight, e.index))

    async def engine_call(self, req: Any, engine: EngineHandle | None = None) -> Any:
        """Send one request to `engine`, or to the engine with the fewest in flight."""
        self._check_alive()
        engine = engine or self.least_busy_engine()
        engine.in_flight += 1
        try:
            return await self.peer.call(engine.identity, req)
        finally:
            engine.in_flight -= 1

    async def engine_broadcast(self, make_req: Callable[[], Any]) -> list[Any]:
        """One request to every live engine (a dead one learns what it needs when it is back)."""
        self._check_alive()
        return await asyncio.gather(*(self.engine_call(make_req(), e) for e in self.live_engines))


def _consume_exception(call: asyncio.Future) -> None:
    if not call.cancelled():
        call.exception()
