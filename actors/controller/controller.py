"""The controller: one asyncio process that owns all state and coordinates every worker.

It binds two ROUTERs: one for the API front-end (requests from HTTP handlers), one for
the workers (trainer ranks and engines). Handlers never compute; they check a request,
record a future, hand the work to the training or sampling service and answer at once.

Run: python -m actors.controller.controller --config RUN_DIR/cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import uvloop
import zmq
import zmq.asyncio

from actors.controller.admin import AdminService
from actors.controller.checkpoints import CheckpointService, as_str_dict
from actors.controller.errors import ApiError
from actors.controller.futures import FutureStore, UnknownFuture
from actors.controller.residency import Residency
from actors.controller.sampling import SamplingService
from actors.controller.schema import SCHEMA_VERSION
from actors.controller.stability import StabilityRecords
from actors.controller.store import StateStore
from actors.controller.training import TrainingService
from actors.controller.workers import TrainerGroupDied, WorkerPool
from cluster.config import ClusterConfig
from cluster.messages import (
    MAX_STATUS_WAIT_S, AdminReq, Caller, CancelFutureReq, CancelFutureResp, ClusterStatusReq, ClusterStatusResp,
    CreateModelReq, CreateSamplingSessionReq, CreateSamplingSessionResp, CreateSessionReq, CreateSessionResp, ErrorResp,
    FinishSessionReq, FinishSessionResp, ForwardBackwardReq, GetInfoReq, GetInfoResp, GetSamplerReq, GetSamplerResp,
    GetSessionReq, GetSessionResp, ListSessionsReq, ListSessionsResp, LoadWeightsReq, OptimStepReq, ReassignUserReq,
    ReassignUserResp, RetrieveFutureReq, RetrieveFuturesReq, SampleReq, SaveWeightsExternalReq,
    SaveWeightsForSamplerReq, SaveWeightsReq, SessionHeartbeatReq, SessionHeartbeatResp, ShutdownEvent, SkipSeqReq,
    SkipSeqResp, UserReq,
)
from cluster.process import die_with_parent, set_process_name, setup_logging
from cluster.transport import AsyncPeer

log = logging.getLogger(__name__)
_SWEEP_INTERVAL_S = 10.0
SHUTDOWN_DELAY_S = 0.3
# what a draining controller refuses: anything that starts new work (polls, heartbeats, listings go on)
NEW_WORK = (CreateSessionReq, CreateModelReq, ForwardBackwardReq, OptimStepReq, SaveWeightsForSamplerReq,
            SaveWeightsReq, SaveWeightsExternalReq, LoadWeightsReq, CreateSamplingSessionReq, SampleReq)


@dataclass
class Session:
    session_id: str
    user: str
    last_heartbeat: float = field(default_factory=time.monotonic)
    finished: bool = False


class Controller:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.started_at = time.time()
        self.ctx = zmq.asyncio.Context()
        self.store = StateStore(config.database_path)
        self.futures = FutureStore(self.store)
        self.workers = WorkerPool(self.ctx, config.controller.worker_address, config.trainer.parallel_dims(),
                                  config.engine.count, config.trainer.call_timeout_s,
                                  config.controller.heartbeat_timeout_s)
        self.stability = StabilityRecords(self.store)
        self.residency = Residency(config.controller, self._engine_fan_out, self._trainer_fan_out,
                                   barrier_timeout_s=config.trainer.call_timeout_s)
        self.workers.on_engine_ready = self._engine_joined
        self.workers.on_trainers_back = self.residency.trainer_joined
        self.sampling = SamplingService(config, self.workers, self.futures, self.store, self.stability,
                                        self.residency)
        self.training = TrainingService(config, self.workers, self.futures, self.store, self.sampling,
                                        self.stability, self.started_at, self.residency)
        self.checkpoints = CheckpointService(self.store)
        self.sessions: dict[str, Session] = {}
        self.api = AsyncPeer(self.ctx, zmq.ROUTER, config.controller.api_address, bind=True)
        self.api_last_seen: float | None = None  # monotonic time of the API's latest request
        self.draining = False  # the admin probe's drain: new work is refused
        self._shutdown = asyncio.Event()
        self.admin = AdminService(self)
        self._handler_owners = (self, self.checkpoints, self.admin)
        self._restore()

    def _restore(self) -> None:
        """Pick up what a previous controller left in the state dir's database.

        Sessions that had not finished live on (their clients may still be there; they
        expire like any other without heartbeats). Training runs do not: their adapters
        were in memory; requests for them get a 410 saying so. Futures left pending can
        never settle and are failed.
        """
        if self.store.found_version < SCHEMA_VERSION:
            log.info("state database %s brought from schema version %d to %d", self.config.database_path,
                     self.store.found_version, SCHEMA_VERSION)
        for session_id, user in self.store.unfinished_sessions():
            self.sessions[session_id] = Session(session_id, user)
        orphans = self.futures.fail_orphans()
        if self.sessions or orphans:
            log.info("restored %d live sessions from %s; failed %d futures left pending",
                     len(self.sessions), self.config.database_path, orphans)

    async def event_loop(self) -> None:
        self.workers.start()
        self.api.start(self._on_api_message)
        tasks = [asyncio.create_task(self.training.run_executor()), asyncio.create_task(self._sweep_forever())]
        if self.residency.colocated:
            tasks.append(asyncio.create_task(self.residency.run(self.workers.ready.wait())))
        log.info("controller listening: api=%s workers=%s", self.api.address, self.workers.peer.address)
        stop = asyncio.create_task(self._shutdown.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stop}:
                task.result()  # a task that ended on its own failed: say why
            log.info("shutting down (asked by the admin probe)")
        finally:
            for task in [*tasks, stop]:
                task.cancel()
            for peer in list(self.workers.group.ranks.values()) + [e.identity for e in self.workers.engines.values()]:
                try:
                    self.workers.peer.send(peer, ShutdownEvent())
                except zmq.ZMQError:
                    pass
            self.store.close()

    def _handler(self, req):
        name = f"handle_{type(req).__name__}"
        return next((getattr(owner, name) for owner in self._handler_owners if hasattr(owner, name)), None)

    def request_shutdown(self) -> None:
        """Stop the event loop shortly (after the answer to the probe has left)."""
        asyncio.get_running_loop().call_later(SHUTDOWN_DELAY_S, self._shutdown.set)

    async def _on_api_message(self, peer: bytes, req) -> None:
        if not isinstance(req, AdminReq):
            self.api_last_seen = time.monotonic()
            if self.draining and isinstance(req, NEW_WORK):
                self.api.reply(peer, req, ErrorResp(status=503, detail="the server is draining (an administrator "
                                                                   "stopped new work); what was queued finishes"))
                return
        handler = self._handler(req)
        if handler is None:
            self.api.reply(peer, req, ErrorResp(status=400, detail=f"unsupported request {type(req).__name__}"))
            return
        if isinstance(req, UserReq) and not req.caller.user:  # the API always names one: a bug, not a guest
            self.api.reply(peer, req, ErrorResp(status=401, detail=f"{type(req).__name__} names no caller"))
            return
        try:
            resp = handler(req)
            if asyncio.iscoroutine(resp):
                resp = await resp
        except ApiError as exc:
            resp = ErrorResp(status=exc.status, detail=exc.detail)
        self.api.reply(peer, req, resp)

    async def _sweep_forever(self) -> None:
        # often enough that a short --session-timeout is honoured within half of it
        interval = min(_SWEEP_INTERVAL_S, self.config.controller.session_timeout_s / 2)
        while True:
            await asyncio.sleep(interval)
            self.futures.sweep()
            self.sampling.sweep()
            self.checkpoints.sweep()
            self.stability.sweep()
            deadline = time.monotonic() - self.config.controller.session_timeout_s
            for session in [s for s in self.sessions.values() if not s.finished and s.last_heartbeat < deadline]:
                log.info("session %s expired (no heartbeat)", session.session_id)
                await self._finish(session, "expired")

    # -- sessions -----------------------------------------------------------------------

    def _session(self, session_id: str, caller: Caller) -> Session:
        """The caller's live session; 404 for one that is not theirs, 410 for one that has finished."""
        session = self.sessions.get(session_id)
        if session is None:
            row = self.store.session(session_id)
            if row is None or not caller.owns(row["user"]):
                raise ApiError(404, f"unknown session {session_id!r}")
            session = Session(session_id, row["user"], finished=True)  # finished before this controller started
        if not caller.owns(session.user):
            raise ApiError(404, f"unknown session {session_id!r}")
        if session.finished:
            reason = (self.store.session(session_id) or {}).get("finish_reason") or "finished"
            why = (f"expired: no heartbeat for {self.config.controller.session_timeout_s:g} s" if reason == "expired"
                   else f"has finished ({reason})")
            raise ApiError(410, f"session {session_id!r} {why}; create a new ServiceClient")
        return session

    def handle_CreateSessionReq(self, req: CreateSessionReq) -> CreateSessionResp:
        session_id = str(uuid.uuid4())
        self.sessions[session_id] = Session(session_id, req.caller.user)
        self.store.add_session(session_id, req.caller.user, req.tags, req.user_metadata, req.sdk_version,
                               req.display_name)
        return CreateSessionResp(session_id=session_id)

    def handle_SessionHeartbeatReq(self, req: SessionHeartbeatReq) -> SessionHeartbeatResp:
        self._session(req.session_id, req.caller).last_heartbeat = time.monotonic()
        return SessionHeartbeatResp()

    async def handle_FinishSessionReq(self, req: FinishSessionReq) -> FinishSessionResp:
        session = self.sessions.get(req.session_id)
        if session is None or not req.caller.owns(session.user):
            row = self.store.session(req.session_id)
            if row is None or not req.caller.owns(row["user"]):
                raise ApiError(404, f"unknown session {req.session_id!r}")
            return FinishSessionResp()  # finished before this controller started: the first reason won
        if not session.finished:  # the first reason wins
            await self._finish(session, req.reason)
        return FinishSessionResp()

    def handle_ListSessionsReq(self, req: ListSessionsReq) -> ListSessionsResp:
        session_ids, total = self.store.sessions(req.caller.listing_user(), req.limit, req.offset)
        return ListSessionsResp(session_ids=session_ids, total_count=total)

    def handle_GetSessionReq(self, req: GetSessionReq) -> GetSessionResp:
        row = self.store.session(req.session_id)
        if row is None or not req.caller.owns(row["user"]):
            raise ApiError(404, f"unknown session {req.session_id!r}")
        return GetSessionResp(training_run_ids=self.store.training_run_ids(req.session_id),
                              sampler_ids=self.store.sampler_ids(req.session_id),
                              user_metadata=as_str_dict(row["user_metadata"]), display_name=row["display_name"])

    async def _finish(self, session: Session, reason: str) -> None:
        session.finished = True
        self.store.finish_session(session.session_id, reason)
        self.training.release_session(session.session_id)
        await self.sampling.release_session(session.session_id)

    # -- training -----------------------------------------------------------------------

    def handle_CreateModelReq(self, req: CreateModelReq):
        return self.training.create(req, self._session(req.session_id, req.caller).user)

    def handle_GetInfoReq(self, req: GetInfoReq) -> GetInfoResp:
        run = self.training.run_for(req.model_id, req.caller)
        if run.lora is None:  # created from a checkpoint that is still loading; 409 makes the SDK retry
            raise ApiError(409, f"model {req.model_id!r} is still loading its checkpoint")
        model = self.config.model
        return GetInfoResp(model_id=run.model_id, model_name=model.name, tokenizer_id=model.tokenizer_dir,
                           arch=model.arch, lora_rank=run.lora.rank)

    def handle_ForwardBackwardReq(self, req: ForwardBackwardReq):
        return self.training.submit(req)

    def handle_OptimStepReq(self, req: OptimStepReq):
        return self.training.submit(req)

    def handle_SaveWeightsForSamplerReq(self, req: SaveWeightsForSamplerReq):
        return self.training.submit(req)

    def handle_SaveWeightsReq(self, req: SaveWeightsReq):
        return self.training.submit(req)

    def handle_SaveWeightsExternalReq(self, req: SaveWeightsExternalReq):
        return self.training.submit(req)

    def handle_SkipSeqReq(self, req: SkipSeqReq) -> SkipSeqResp:
        # only for the caller's own runs: anyone else's seq_ids are not theirs to spend
        self.training.skip(self.training.run_for(req.model_id, req.caller), req.seq_id)
        return SkipSeqResp()

    def handle_LoadWeightsReq(self, req: LoadWeightsReq):
        if req.model_id is not None:  # legacy load_state into an existing model
            if req.seq_id is None:
                raise ApiError(400, "load_weights with a model_id needs a seq_id")
            return self.training.submit(req)
        if req.session_id is None or req.model_seq_id is None:
            raise ApiError(400, "load_weights needs either model_id + seq_id or session_id + model_seq_id")
        return self.training.create_from_state(req, self._session(req.session_id, req.caller).user)

    # -- sampling -----------------------------------------------------------------------

    async def handle_CreateSamplingSessionReq(self, req: CreateSamplingSessionReq) -> CreateSamplingSessionResp:
        user = self._session(req.session_id, req.caller).user
        return CreateSamplingSessionResp(sampling_session_id=await self.sampling.create_session(req, user))

    def handle_GetSamplerReq(self, req: GetSamplerReq) -> GetSamplerResp:
        row = self.sampling.sampler_record(req.sampler_id, req.caller)
        return GetSamplerResp(sampler_id=req.sampler_id, base_model=row["base_model"], model_path=row["model_path"])

    def handle_SampleReq(self, req: SampleReq):
        return self.sampling.submit(req)

    # -- futures and status -------------------------------------------------------------

    async def handle_RetrieveFutureReq(self, req: RetrieveFutureReq):
        try:
            return await self.futures.wait(req.request_id, req.wait_s, req.caller)
        except UnknownFuture:
            raise ApiError(404, f"unknown request_id {req.request_id!r}") from None

    async def handle_RetrieveFuturesReq(self, req: RetrieveFuturesReq):
        return await self.sampling.retrieve_completions(req)

    async def handle_CancelFutureReq(self, req: CancelFutureReq) -> CancelFutureResp:
        if self.futures.kind(req.request_id, req.caller) is None:
            raise ApiError(404, f"unknown request_id {req.request_id!r}")
        return CancelFutureResp(cancelled=await self.sampling.cancel(req.request_id))

    # -- users --------------------------------------------------------------------------

    def handle_ReassignUserReq(self, req: ReassignUserReq) -> ReassignUserResp:
        if not req.caller.admin:
            raise ApiError(403, "reassigning rows between users needs an admin key")
        moved = self.store.reassign_user(req.from_user, req.to_user)
        for owned in (*self.sessions.values(), *self.training.runs.values(), *self.sampling.sessions.values()):
            if owned.user == req.from_user:
                owned.user = req.to_user
        self.futures.reassign_user(req.from_user, req.to_user)
        log.info("admin %s handed %s's rows to %s: %s", req.caller.user, req.from_user, req.to_user, moved)
        return ReassignUserResp(moved=moved)

    async def handle_ClusterStatusReq(self, req: ClusterStatusReq) -> ClusterStatusResp:
        if req.wait_s > 0:
            await self.workers.wait_settled(min(req.wait_s, MAX_STATUS_WAIT_S))
        return ClusterStatusResp(ready=self.workers.ready.is_set() and not self.workers.failure,
                                 model_name=self.config.model.name, workers=self.workers.describe(),
                                 detail=self.workers.failure or "", failed=bool(self.workers.failure),
                                 residency=self.residency.describe(), degraded=self.workers.degraded)

    # -- residency fan-outs (actors/controller/residency.py) ----------------------------

    async def _engine_fan_out(self, make_req) -> dict:
        names = [f"engine{e.index}" for e in self.workers.live_engines]  # engine_broadcast's order
        return dict(zip(names, await self.workers.engine_broadcast(make_req)))

    def _engine_joined(self, engine) -> None:
        """A (re)started engine said hello holding its memory: colocated, it may have to give it back."""
        async def release_it(make_req) -> dict:
            return {f"engine{engine.index}": await self.workers.engine_call(make_req(), engine)}
        self.residency.engine_joined(release_it)

    async def _trainer_fan_out(self, make_req) -> dict:
        """A barrier step on every rank. A trainer group that is restarting is waited for, and one that dies under
        the step is too, and the step runs again on the new group (onload and offload are idempotent); the
        launcher's bounded restarts end it with TrainerGroupLost."""
        while True:
            await self.workers.wait_for_trainers()
            try:
                replies = await self.workers.trainer_broadcast(make_req)
            except TrainerGroupDied:
                continue
            return {f"trainer{rank}": reply for rank, reply in enumerate(replies)}


def run_controller_process(config: ClusterConfig) -> None:
    set_process_name("tinkerd-ctrl")
    die_with_parent()
    setup_logging("controller")
    uvloop.run(Controller(config).event_loop())


def main() -> None:
    parser = argparse.ArgumentParser(description="tinkerd controller process")
    parser.add_argument("--config", required=True)
    run_controller_process(ClusterConfig.load(parser.parse_args().config))


if __name__ == "__main__":
    main()
