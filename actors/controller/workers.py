"""The controller's side of the trainer ranks and engines: one ROUTER, two groups.

Trainer ranks act as one: every training step is a fan-out to all of them and a
barrier on all replies, each reply within the trainer timeout. Their layout is a
ParallelDims (cluster/parallel.py): each rank says where it sits when it says hello, and
the pool refuses a rank whose coordinates disagree with the layout. Engines act alone:
each sample goes to the least busy live one.

Every rank and engine heartbeats (WorkerHeartbeatEvent, from a thread of its own).
A torch.distributed group cannot be healed, so the trainer ranks live and die as one
group (TrainerGroup): it is declared dead when a rank's heartbeat is
`heartbeat_timeout_s` late (a hang: SIGSTOP, a stuck collective), when a call is past the
trainer timeout, when a rank reports a failure or says hello again, or when the launcher
reports that its processes exited. Its calls in flight then fail with TrainerGroupDied;
the launcher restarts the whole group, and once every rank has said hello again the
training service rebuilds its runs (actors/controller/recovery.py). If the launcher
gives up (a host is gone, restarts keep failing), the group is lost: training fails with
TrainerGroupLost (a 503) while sampling goes on. A rank that fails before the group was
ever ready poisons the pool instead: that is a broken configuration, not a crash.

An engine that dies is one engine down, not the cluster: it is declared dead on a late
heartbeat, a failure report or a new hello (the launcher restarted it). Its calls in
flight fail with EngineDied, which the sampling service re-queues on another live
engine; it is taken back when it is ready. An engine that fails before it was ever
ready poisons the pool.
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
class HeartbeatRecord:
    at: float  # monotonic
    pid: int
    host: str
    memory: dict[str, float]


class EngineDied(WorkerFailure):
    """The engine a call went to died before it answered (the call may be tried on another)."""


class TrainerGroupDied(WorkerFailure):
    """The trainer group died (or hung) before it answered; the launcher restarts it."""


class TrainerGroupLost(WorkerFailure):
    """The trainer group is gone for good: the launcher could not restart it."""


@dataclass
class TrainerGroup:
    """The trainer ranks as one unit: `generation` counts the times it became ready."""

    state: str = "starting"  # starting | ready | dead (restarting) | lost
    ranks: dict[int, bytes] = field(default_factory=dict)  # rank -> identity, this generation
    beats: dict[int, HeartbeatRecord] = field(default_factory=dict)  # rank -> its latest heartbeat
    generation: int = 0
    deaths: int = 0  # how many times the controller declared it dead (the launcher compares)
    why: str = ""  # why it died, or why it is lost
    died_at: float = 0.0  # monotonic
    ready_at: float = 0.0


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
    lost: bool = False  # the launcher gave up restarting it
    info: dict[str, Any] = field(default_factory=dict)  # what it said about itself when ready


class WorkerPool:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, dims: ParallelDims, engines: int,
                 trainer_timeout_s: float | None = None, heartbeat_timeout_s: float = 10.0):
        self.peer = AsyncPeer(ctx, zmq.ROUTER, address, bind=True)
        # a restarted rank or engine reconnects under its old identity: it takes over from the dead connection
        self.peer.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.dims = dims
        self.expected_trainers = dims.world_size
        self.trainer_timeout_s = trainer_timeout_s
        self.expected_engines = engines
        self.group = TrainerGroup()
        self.trainers_ready = asyncio.Event()  # set while the group is ready
        self.engines: dict[int, EngineHandle] = {}
        self.trainer_info: dict[str, Any] = {}
        self.ready = asyncio.Event()  # every worker said hello once: the cluster started
        self.failure: str | None = None
        self.settled = asyncio.Event()  # started, or failed to: what a waiting ClusterStatusReq waits for
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.engine_restarts = 0
        self.engine_deaths: dict[int, int] = {}  # index -> how many times it was declared dead (the launcher compares)
        self.on_engine_ready: Callable[[EngineHandle], None] = lambda engine: None  # after a restart too
        self.on_trainers_back: Callable[[], None] = lambda: None  # a restarted trainer group is ready
        self._watchdog: asyncio.Task | None = None

    def start(self) -> None:
        self.peer.start(self._on_message)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_heartbeats())

    @property
    def trainers(self) -> dict[int, bytes]:
        return self.group.ranks

    async def _watch_heartbeats(self) -> None:
        """Declare dead every engine, and the trainer group, whose heartbeat is late (a few checks per timeout)."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_timeout_s / 4))
            now = time.monotonic()
            deadline = now - self.heartbeat_timeout_s
            for engine in [e for e in self.engines.values() if e.alive and e.last_heartbeat < deadline]:
                self._engine_died(engine, f"no heartbeat for {self.heartbeat_timeout_s:g} s")
            if self.group.state == "ready":
                # a rank that never beat this generation is timed from when the group became ready
                late = [r for r in self.group.ranks
                        if max(self.group.beats[r].at if r in self.group.beats else 0.0, self.group.ready_at)
                        < deadline]
                if late:
                    self.trainer_group_died(f"trainer rank(s) {late} sent no heartbeat for "
                                            f"{self.heartbeat_timeout_s:g} s (hung or stopped)")

    def _on_message(self, peer: bytes, msg: Any) -> None:
        handler = getattr(self, f"handle_{type(msg).__name__}", None)
        if handler is None:
            log.warning("worker %r sent unexpected %s", peer, type(msg).__name__)
            return
        handler(peer, msg)

    def handle_WorkerReadyEvent(self, peer: bytes, msg: WorkerReadyEvent) -> None:
        log.info("%s %d/%d ready", msg.role, msg.rank, msg.world_size)
        if msg.role == "trainer":
            self._trainer_ready(peer, msg)
        elif msg.role == "engine":
            previous = self.engines.get(msg.rank)
            if previous is not None:  # restarted: whatever the old one was computing is lost
                if previous.alive:
                    self._engine_died(previous, "it started again")
                self.engine_restarts += 1
            self.engines[msg.rank] = EngineHandle(msg.rank, peer, msg.weights_address, info=dict(msg.info))
            self.on_engine_ready(self.engines[msg.rank])
        if self.group.generation > 0 and len(self.engines) == self.expected_engines:
            self.ready.set()
            self.settled.set()

    def _trainer_ready(self, peer: bytes, msg: WorkerReadyEvent) -> None:
        expected = self.dims.coords(msg.rank) if 0 <= msg.rank < self.dims.world_size else None
        if msg.coords != expected:
            self._fail(f"trainer {msg.rank} reports coordinates {msg.coords}, but the layout "
                       f"{self.dims.describe()} puts it at {expected}")
            return
        if self.group.state == "ready":  # a rank of a new group: the old group is gone, whatever we knew
            self.trainer_group_died(f"trainer rank {msg.rank} started again")
        if self.group.state == "lost":
            return
        self.group.ranks[msg.rank] = peer
        if msg.rank == 0:
            self.trainer_info = dict(msg.info)
        if len(self.group.ranks) == self.expected_trainers:
            group = self.group
            group.state, group.generation, group.ready_at, group.why = "ready", group.generation + 1, \
                time.monotonic(), ""
            self.trainers_ready.set()
            if group.generation > 1:
                log.warning("trainer group ready again (generation %d, %.1f s after it died)", group.generation,
                            group.ready_at - group.died_at)
                self.on_trainers_back()

    def trainer_group_died(self, why: str) -> None:
        """The group is gone (or hung): fail its calls in flight; the launcher restarts it."""
        group = self.group
        if group.state != "ready":
            return  # already dead (or lost, or never started): nothing in flight, nothing to count
        group.state, group.why, group.died_at = "dead", why, time.monotonic()
        group.deaths += 1
        self.trainers_ready.clear()
        identities, group.ranks, group.beats = list(group.ranks.values()), {}, {}
        log.error("trainer group died (%s); its calls in flight fail, and the launcher restarts the group", why)
        for identity in identities:
            self.peer.fail_pending(identity, TrainerGroupDied(f"the trainer group died: {why}"))

    def trainer_group_lost(self, why: str) -> None:
        """The launcher gave up restarting the group: training is unavailable from now on."""
        self.trainer_group_died(why)
        self.group.state, self.group.why = "lost", why
        self.trainers_ready.set()  # wake whoever waits for the group: it is not coming back
        log.error("trainer group lost: %s; training answers 503, sampling goes on", why)

    async def wait_for_trainers(self) -> None:
        """Until the group is ready again; TrainerGroupLost if it never will be."""
        await self.trainers_ready.wait()
        if self.group.state == "lost":
            raise TrainerGroupLost(self.training_unavailable)

    @property
    def training_unavailable(self) -> str:
        """Why training cannot run at all, or "" (a group that is restarting will be back)."""
        if self.group.state != "lost":
            return ""
        return (f"training is unavailable: the trainer group ({self.dims.describe()}) could not be restarted "
                f"({self.group.why}); sampling still works, and tinkerd must be restarted (with a layout its "
                f"hosts can meet) to train again")

    def handle_WorkerHeartbeatEvent(self, peer: bytes, msg: WorkerHeartbeatEvent) -> None:
        if msg.role == "trainer":
            if self.group.ranks.get(msg.rank) is not None:
                self.group.beats[msg.rank] = HeartbeatRecord(time.monotonic(), msg.pid, msg.host, dict(msg.memory))
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
        if msg.role == "trainer" and self.group.generation > 0:  # a crash, not a broken configuration
            self.trainer_group_died(f"trainer rank {msg.rank} failed: {msg.error}")
            return
        self._fail(f"{msg.role} {msg.rank} failed: {msg.error}")
        self.peer.fail_pending(peer, WorkerFailure(self.failure))

    def _fail(self, why: str) -> None:
        """A broken configuration (not a crash): the cluster will never be ready."""
        self.failure = why
        log.error("%s", why)
        self.settled.set()

    async def wait_settled(self, timeout_s: float) -> None:
        """Until the cluster has started or failed to, or `timeout_s` passed."""
        try:
            await asyncio.wait_for(self.settled.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def _engine_died(self, engine: EngineHandle, why: str) -> None:
        engine.alive, engine.death = False, f"engine {engine.index} died ({why})"
        self.engine_deaths[engine.index] = self.engine_deaths.get(engine.index, 0) + 1
        log.error("%s; its calls in flight fail, and the launcher restarts it", engine.death)
        self.peer.fail_pending(engine.identity, EngineDied(engine.death))

    def engine_exited(self, index: int, why: str) -> None:
        """The launcher saw the engine's process exit: no need to wait for its heartbeats to stop."""
        engine = self.engines.get(index)
        if engine is not None and engine.alive:
            self._engine_died(engine, why)

    def engine_lost(self, index: int, why: str) -> None:
        engine = self.engines.get(index)
        if engine is None:
            return
        if engine.alive:
            self._engine_died(engine, why)
        engine.lost, engine.death = True, f"engine {index} is lost ({why})"
        log.error("%s; sampling goes on with the other engines", engine.death)

    @property
    def degraded(self) -> str:
        """What of the cluster is gone for good while the rest serves, or ""."""
        gone = [self.training_unavailable] if self.training_unavailable else []
        gone += [e.death for e in self.engines.values() if e.lost]
        return "; ".join(gone)

    def describe(self) -> dict[str, str]:
        group_state = "dead (restarting)" if self.group.state == "dead" else self.group.state
        states = {f"trainer{r}": "ready" for r in self.trainers} if self.group.state == "ready" else \
            {f"trainer{r}": group_state for r in range(self.expected_trainers) if self.group.generation > 0}
        states.update({f"engine{i}": _engine_state(e) for i, e in self.engines.items()})
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
        if self.group.state == "lost":
            raise TrainerGroupLost(self.training_unavailable)
        if self.group.state != "ready":
            raise TrainerGroupDied(f"the trainer group is not ready ({self.group.why or self.group.state})")
        peers = [self.trainers[r] for r in range(self.expected_trainers)]
        calls = [asyncio.ensure_future(self.peer.call(p, r, self.trainer_timeout_s)) for p, r in zip(peers, reqs)]
        try:
            return list(await asyncio.gather(*calls))
        except TimeoutError:
            await asyncio.wait(calls)  # they share one deadline: the others are done or late now
            late = [rank for rank, c in enumerate(calls) if isinstance(c.exception(), TimeoutError)]
            # a hung collective leaves the ranks out of step: only a new group can be trusted
            self.trainer_group_died(f"trainer rank(s) {late} did not answer {type(reqs[0]).__name__} within "
                                    f"{self.trainer_timeout_s:g} s (a hung collective or a lost message)")
            raise TrainerGroupDied(f"the trainer group died: {self.group.why}") from None
        finally:
            for call in calls:  # the replies still due after an early error are not awaited by anyone
                call.add_done_callback(_consume_exception)

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


def _engine_state(engine: EngineHandle) -> str:
    return "ready" if engine.alive else "lost" if engine.lost else "dead (restarting)"


def _consume_exception(call: asyncio.Future) -> None:
    if not call.cancelled():
        call.exception()
