"""Sampling sessions and sample requests.

A sampling session is bound, once and for all, to one adapter id (or to the bare base
model). Adapter ids name immutable snapshots: `tinker://…/sampler_weights/<name>` for
named checkpoints, `<model_id>@<seq_id>` for ephemeral ones, so a sampling client
never sees weights drift as training goes on. Samples have no ordering; each goes to
the least busy live engine as soon as it arrives, and engines batch whatever they hold.
When that engine dies (workers.py), the sample is re-queued on another live one, at most
ENGINE_ATTEMPTS times; with none alive it fails with the cause.

Sampling sessions are recorded in SQLite. After a controller restart, one bound to a
checkpoint or to the base model comes back on first use (the checkpoint is reloaded
from disk); one bound to an ephemeral snapshot cannot, its weights were in memory only.

Completions are also logged per (sampling session, clone) for `retrieve_futures`, the
SDK's batched polling: a poll acknowledges everything up to its cursor and gets every
later completion. Cursors start at the controller's start time in microseconds, so a
cursor from before a restart is never ahead of the new ones.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from actors.controller.errors import ApiError, failure_of
from actors.controller.futures import FutureStore, Waiters
from actors.controller.residency import Residency
from actors.controller.stability import StabilityRecords
from actors.controller.store import StateStore
from actors.controller.workers import EngineDied, EngineHandle, WorkerFailure, WorkerPool
from cluster.config import ClusterConfig
from cluster.messages import (
    Caller, CreateSamplingSessionReq, EngineCancelSampleReq, EngineLoadAdapterFromDiskReq, EngineSampleReq,
    EngineUnloadAdapterReq, FutureCompletion, RetrieveFuturesReq, RetrieveFuturesResp, SampleReq, SampleResult,
    SubmitResp,
)
from cluster.sample_options import check_engine_support
from cluster.transport import RemoteError

log = logging.getLogger(__name__)
_REQUEST_MEMORY_S = 3600.0  # how long a (session, seq_id) keeps answering retries, a completion its poller
CLONE_SEQ_STRIDE = 1_000_000_000  # a cloned SamplingClient's seq_ids start at clone_id * this
ENGINE_ATTEMPTS = 3  # engines a sample may be tried on when the one computing it dies


@dataclass
class SamplingSession:
    sampling_session_id: str
    session_id: str
    user: str
    base_model: str
    adapter_id: str | None
    model_path: str | None


@dataclass
class _Adapter:
    owner_session: str
    disk_path: str | None


@dataclass
class _CompletionLog:
    """One (sampling session, clone)'s completions not yet acknowledged by its poller."""

    entries: deque = field(default_factory=deque)  # (cursor, settled monotonic, FutureCompletion)
    arrived: Waiters = field(default_factory=Waiters)  # the polls held until a completion comes

    def add(self, cursor: int, completion: FutureCompletion) -> None:
        self.entries.append((cursor, time.monotonic(), completion))
        self.arrived.wake()

    def ack(self, cursor: int) -> None:
        while self.entries and self.entries[0][0] <= cursor:
            self.entries.popleft()

    def after(self, cursor: int) -> list[tuple[int, FutureCompletion]]:
        return [(c, done) for c, _, done in self.entries if c > cursor]

    def forget_older_than(self, cutoff: float) -> None:
        while self.entries and self.entries[0][1] < cutoff:
            self.entries.popleft()


class SamplingService:
    def __init__(self, config: ClusterConfig, workers: WorkerPool, futures: FutureStore, store: StateStore,
                 stability: StabilityRecords, residency: Residency | None = None):
        self.config = config
        self.residency = residency or Residency(config.controller)
        self.stability = stability
        self.workers = workers
        self.futures = futures
        self.store = store
        self.sessions: dict[str, SamplingSession] = {}
        self.adapters: dict[str, _Adapter] = {}  # loaded on every engine
        self._requests: dict[tuple[str, int], tuple[float, SubmitResp]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[str, EngineHandle] = {}  # request_id -> the engine computing it
        self._logs: dict[tuple[str, int], _CompletionLog] = {}
        self._log_of: dict[str, tuple[str, int]] = {}  # pending request_id -> its log's key
        self._cursor = int(time.time() * 1e6)

    # -- sessions -----------------------------------------------------------------------

    def add_session(self, session_id: str, user: str, seq: int, base_model: str, adapter_id: str | None,
                    model_path: str | None) -> str:
        sampling_session_id = f"{session_id}:sample:{seq}"
        self.sessions[sampling_session_id] = SamplingSession(
            sampling_session_id, session_id, user, base_model, adapter_id, model_path)
        self.store.add_sampler(sampling_session_id, session_id, user, base_model, adapter_id, model_path)
        return sampling_session_id

    async def create_session(self, req: CreateSamplingSessionReq, user: str) -> str:
        """A sampling session in the caller's session `req.session_id` (its owner is `user`)."""
        existing = self.sessions.get(f"{req.session_id}:sample:{req.sampling_session_seq_id}")
        if existing is not None:
            return existing.sampling_session_id
        if req.model_path:
            adapter_id = await self._adapter_for_path(req.model_path, req.session_id, req.caller)
        else:
            served = {self.config.model.name, self.config.model.path}
            if req.base_model not in served:
                raise ApiError(400, f"base_model {req.base_model!r} is not served here; this server serves "
                                    f"{self.config.model.name!r}")
            adapter_id = None
        return self.add_session(req.session_id, user, req.sampling_session_seq_id, self.config.model.name,
                                adapter_id, req.model_path)

    def _sampler_checkpoint(self, model_path: str, caller: Caller | None = None) -> dict:
        """The sampler checkpoint at model_path: the caller's own or a published one (any, without a caller)."""
        if "/sampler_weights/" not in model_path:
            raise ApiError(400, f"can only sample from sampler_weights checkpoints, got {model_path!r}")
        checkpoint = self.store.checkpoint(model_path)
        if checkpoint is None or not (caller is None or checkpoint["public"] or caller.owns(checkpoint["user"])):
            raise ApiError(404, f"no checkpoint at {model_path!r}")
        return checkpoint

    async def _adapter_for_path(self, model_path: str, session_id: str, caller: Caller) -> str:
        checkpoint = self._sampler_checkpoint(model_path, caller)
        if model_path not in self.adapters:
            await self._load_from_disk(model_path, checkpoint["directory"])
            self.adapter_loaded(model_path, owner_session=session_id, disk_path=checkpoint["directory"])
        return model_path

    async def _load_from_disk(self, adapter_id: str, directory: str) -> None:
        await self.workers.engine_broadcast(lambda: EngineLoadAdapterFromDiskReq(adapter_id=adapter_id, path=directory))

    def adapter_loaded(self, adapter_id: str, owner_session: str, disk_path: str | None) -> None:
        self.adapters[adapter_id] = _Adapter(owner_session, disk_path)

    def session_info(self, sampling_session_id: str, caller: Caller) -> SamplingSession:
        """The caller's sampling session; 404 if it is not theirs, 410 if it cannot serve any more."""
        session = self.sessions.get(sampling_session_id)
        if session is None:
            session = self._restore(sampling_session_id, caller)
        if not caller.owns(session.user):
            raise _unknown_sampling_session(sampling_session_id)
        return session

    def _restore(self, sampling_session_id: str, caller: Caller) -> SamplingSession:
        """A sampling session recorded before this controller started (or since finished)."""
        row = self.store.sampler(sampling_session_id)
        if row is None or not caller.owns(row["user"]):
            raise _unknown_sampling_session(sampling_session_id)
        owner = self.store.session(row["session_id"])
        if owner is None or owner["finished"] is not None:
            raise ApiError(410, f"sampling session {sampling_session_id!r} is gone: its session "
                                f"{row['session_id']} has finished; create a new sampling client")
        if row["adapter_id"] is not None and row["model_path"] is None:
            raise ApiError(410, f"sampling session {sampling_session_id!r} sampled in-memory weights that did not "
                                "survive a server restart; save the weights again and create a new sampling client")
        if row["model_path"] is not None:  # engines load it on first use (the 410 path of _sample)
            checkpoint = self._sampler_checkpoint(row["model_path"])
            self.adapter_loaded(row["model_path"], owner_session=row["session_id"], disk_path=checkpoint["directory"])
        session = SamplingSession(sampling_session_id, row["session_id"], row["user"], row["base_model"],
                                  row["adapter_id"], row["model_path"])
        self.sessions[sampling_session_id] = session
        log.info("restored sampling session %s from the database", sampling_session_id)
        return session

    def sampler_record(self, sampler_id: str, caller: Caller) -> dict:
        """What GET samplers/{id} reports, for any sampling session of the caller's ever created."""
        row = self.store.sampler(sampler_id)
        if row is None or not caller.owns(row["user"]):
            raise ApiError(404, f"unknown sampler {sampler_id!r}")
        return row

    async def release_session(self, session_id: str) -> None:
        """Forget a finished session's sampling sessions and unload its ephemeral adapters."""
        for sid in [s for s, v in self.sessions.items() if v.session_id == session_id]:
            del self.sessions[sid]
            for key in [k for k in self._logs if k[0] == sid]:
                del self._logs[key]
        ephemeral = [a for a, v in self.adapters.items() if v.owner_session == session_id and not v.disk_path]
        for adapter_id in ephemeral:
            del self.adapters[adapter_id]
            try:
                await self.workers.engine_broadcast(lambda: EngineUnloadAdapterReq(adapter_id=adapter_id))
            except (RemoteError, WorkerFailure) as exc:
                log.warning("unloading %s failed: %s", adapter_id, exc)

    # -- samples ------------------------------------------------------------------------

    def submit(self, req: SampleReq) -> SubmitResp:
        session = self.session_info(req.sampling_session_id, req.caller)
        try:  # refused now, as a 400 the SDK raises at once, not as a failed future later
            check_engine_support(req, self.workers.engine_unsupported)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        key = (req.sampling_session_id, req.seq_id)
        if key in self._requests:  # a retry of a submission whose answer got lost
            return self._requests[key][1]
        request_id = self.futures.create("sample", session.user)
        resp = SubmitResp(request_id=request_id, sample_sequence_ids=[
            f"{req.sampling_session_id}:{req.seq_id}:{i}" for i in range(req.num_samples)])
        self._requests[key] = (time.monotonic(), resp)
        self._log_of[request_id] = (req.sampling_session_id, req.seq_id // CLONE_SEQ_STRIDE)
        engine_req = EngineSampleReq(
            adapter_id=session.adapter_id, request_id=request_id, prompt_tokens=req.prompt_tokens,
            num_samples=req.num_samples, params=req.params, prompt_logprobs=req.prompt_logprobs,
            topk_prompt_logprobs=req.topk_prompt_logprobs, topk_sample_logprobs=req.topk_sample_logprobs,
            prompt_logprobs_last_n=req.prompt_logprobs_last_n, target_prompt_token_ids=req.target_prompt_token_ids,
            target_prompt_listed=req.target_prompt_listed, prompt_alt_tokens_k=req.prompt_alt_tokens_k)
        record = None
        if req.record_stability_info:  # for stable_reinforce, which trains on what is recorded here
            record = functools.partial(self.stability.record, session.session_id, session.user,
                                       req.sampling_session_id, session.adapter_id, req, resp.sample_sequence_ids)
        task = asyncio.get_running_loop().create_task(self._sample(request_id, engine_req, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return resp

    async def _on_engine(self, request_id: str, engine_req: EngineSampleReq):
        # colocated: waits while the trainer holds the devices (residency.py); dedicated: no-op
        async with self.residency.sampling():
            if not self.futures.is_pending(request_id):
                raise ApiError(499, "the sample was cancelled")  # while it waited: nothing to compute
            engine = self.workers.least_busy_engine()
            self._running[request_id] = engine
            return await self.workers.engine_call(engine_req, engine)

    async def _sample(self, request_id: str, engine_req: EngineSampleReq,
                      record: Callable[[SampleResult], None] | None) -> None:
        """Run one sample request and settle its future; `record` keeps its sequences first."""
        try:
            result = await self._sampled(request_id, engine_req)
            if record is not None:
                record(result)
        except Exception as exc:
            error, category = failure_of(exc, "sample")
            self._settle(request_id, error=error, category=category)
        else:
            self._settle(request_id, result=result)
        finally:
            self._running.pop(request_id, None)

    async def _sampled(self, request_id: str, engine_req: EngineSampleReq) -> SampleResult:
        """The request's result; re-queued on another live engine when the one computing it dies."""
        for attempt in range(1, ENGINE_ATTEMPTS + 1):
            try:
                return await self._sampled_once(request_id, engine_req)
            except EngineDied as exc:
                if attempt == ENGINE_ATTEMPTS:
                    raise WorkerFailure(f"{exc}; the sample was lost with {attempt} engines in a row") from None
                log.warning("%s while computing %s; re-queueing it", exc, request_id)
        raise AssertionError("unreachable")

    async def _sampled_once(self, request_id: str, engine_req: EngineSampleReq) -> SampleResult:
        try:
            return (await self._on_engine(request_id, engine_req)).result
        except RemoteError as exc:
            adapter = self.adapters.get(engine_req.adapter_id or "")
            if exc.status != 410 or adapter is None:
                raise
            if not adapter.disk_path:
                raise ApiError(410, f"the in-memory snapshot {engine_req.adapter_id!r} is not on the engine that "
                                    f"took the sample ({exc.detail}); an engine that restarted lost it: save the "
                                    f"weights for sampling again") from None
        # an engine evicted this snapshot (or never had it: restored or restarted); reload it from disk
        await self._load_from_disk(engine_req.adapter_id, adapter.disk_path)
        return (await self._on_engine(request_id, engine_req)).result

    def _settle(self, request_id: str, result=None, error: str = "", category: str = "server") -> None:
        if not self.futures.is_pending(request_id):
            return  # cancelled meanwhile
        if error:
            self.futures.fail(request_id, error, category)
        else:
            self.futures.resolve(request_id, result)
        key = self._log_of.pop(request_id, None)
        if key is not None:
            self._cursor += 1
            state = "failed" if error else "finished"
            self._logs.setdefault(key, _CompletionLog()).add(self._cursor, FutureCompletion(request_id=request_id,
                                                                                         state=state))

    async def cancel(self, request_id: str) -> bool:
        """Cancel a pending sample: its future fails at once, its engine drops the work."""
        if self.futures.kind(request_id) != "sample":
            raise ApiError(400, f"{request_id!r} is not a sample request; only samples can be cancelled")
        if not self.futures.is_pending(request_id):
            return False
        self._settle(request_id, error="the sample was cancelled by the client", category="user")
        engine = self._running.get(request_id)
        if engine is not None:
            try:
                await self.workers.engine_call(EngineCancelSampleReq(request_id=request_id), engine)
            except (RemoteError, WorkerFailure) as exc:
                log.warning("engine %d could not cancel %s: %s", engine.index, request_id, exc)
        return True

    async def retrieve_completions(self, req: RetrieveFuturesReq) -> RetrieveFuturesResp:
        key = (req.sampling_session_id, req.cloned_sampler_id)
        self.session_info(req.sampling_session_id, req.caller)  # 404 / 410 for a session that is not there
        completions = self._logs.get(key)
        if completions is None:
            completions = self._logs.setdefault(key, _CompletionLog())
        completions.ack(req.prev_cursor)
        if not completions.after(req.prev_cursor) and req.wait_s > 0:
            await completions.arrived.wait(req.wait_s)
        found = completions.after(req.prev_cursor)
        return RetrieveFuturesResp(completions=[done for _, done in found],
                                   cursor=found[-1][0] if found else req.prev_cursor)

    def sweep(self) -> None:
        cutoff = time.monotonic() - _REQUEST_MEMORY_S
        for key in [k for k, (t, _) in self._requests.items() if t < cutoff]:
            del self._requests[key]
        for completions in self._logs.values():  # a poller that stopped acknowledging
            completions.forget_older_than(cutoff)


def _unknown_sampling_session(sampling_session_id: str) -> ApiError:
    return ApiError(404, f"unknown sampling session {sampling_session_id!r}")
