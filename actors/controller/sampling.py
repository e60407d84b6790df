"""Sampling sessions and sample requests.

A sampling session is bound, once and for all, to one adapter id (or to the bare base
model). Adapter ids name immutable snapshots: `tinker://…/sampler_weights/<name>` for
named checkpoints, `<model_id>@<seq_id>` for ephemeral ones, so a sampling client
never sees weights drift as training goes on. Samples have no ordering; each goes to
the least busy engine as soon as it arrives, and engines batch whatever they hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from actors.controller.errors import ApiError, category_for
from actors.controller.futures import FutureStore
from actors.controller.store import StateStore
from actors.controller.workers import WorkerFailure, WorkerPool
from cluster.config import ClusterConfig
from cluster.messages import (
    CreateSamplingSessionReq, EngineLoadAdapterFromDiskReq, EngineSampleReq, EngineUnloadAdapterReq,
    SampleReq, SubmitResp,
)
from cluster.transport import RemoteError

log = logging.getLogger(__name__)
_REQUEST_MEMORY_S = 3600.0  # how long a (session, seq_id) keeps answering retries


@dataclass
class SamplingSession:
    sampling_session_id: str
    session_id: str
    base_model: str
    adapter_id: str | None
    model_path: str | None


@dataclass
class _Adapter:
    owner_session: str
    disk_path: str | None


class SamplingService:
    def __init__(self, config: ClusterConfig, workers: WorkerPool, futures: FutureStore, store: StateStore):
        self.config = config
        self.workers = workers
        self.futures = futures
        self.store = store
        self.sessions: dict[str, SamplingSession] = {}
        self.adapters: dict[str, _Adapter] = {}  # loaded on every engine
        self._requests: dict[tuple[str, int], tuple[float, SubmitResp]] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- sessions -----------------------------------------------------------------------

    def add_session(self, session_id: str, seq: int, base_model: str, adapter_id: str | None,
                    model_path: str | None) -> str:
        sampling_session_id = f"{session_id}:sample:{seq}"
        self.sessions[sampling_session_id] = SamplingSession(
            sampling_session_id, session_id, base_model, adapter_id, model_path)
        return sampling_session_id

    async def create_session(self, req: CreateSamplingSessionReq) -> str:
        existing = self.sessions.get(f"{req.session_id}:sample:{req.sampling_session_seq_id}")
        if existing is not None:
            return existing.sampling_session_id
        if req.model_path:
            adapter_id = await self._adapter_for_path(req.model_path, req.session_id)
        else:
            served = {self.config.model.name, self.config.model.path}
            if req.base_model not in served:
                raise ApiError(400, f"base_model {req.base_model!r} is not served here; this server serves "
                                    f"{self.config.model.name!r}")
            adapter_id = None
        return self.add_session(req.session_id, req.sampling_session_seq_id, self.config.model.name,
                                adapter_id, req.model_path)

    async def _adapter_for_path(self, model_path: str, session_id: str) -> str:
        if "/sampler_weights/" not in model_path:
            raise ApiError(400, f"can only sample from sampler_weights checkpoints, got {model_path!r}")
        checkpoint = self.store.checkpoint(model_path)
        if checkpoint is None:
            raise ApiError(404, f"no checkpoint at {model_path!r}")
        if model_path not in self.adapters:
            await self._load_from_disk(model_path, checkpoint["directory"])
            self.adapter_loaded(model_path, owner_session=session_id, disk_path=checkpoint["directory"])
        return model_path

    async def _load_from_disk(self, adapter_id: str, directory: str) -> None:
        await self.workers.engine_broadcast(lambda: EngineLoadAdapterFromDiskReq(adapter_id=adapter_id, path=directory))

    def adapter_loaded(self, adapter_id: str, owner_session: str, disk_path: str | None) -> None:
        self.adapters[adapter_id] = _Adapter(owner_session, disk_path)

    def session_info(self, sampling_session_id: str) -> SamplingSession:
        session = self.sessions.get(sampling_session_id)
        if session is None:
            raise ApiError(404, f"unknown sampling session {sampling_session_id!r}")
        return session

    async def release_session(self, session_id: str) -> None:
        """Forget a finished session's sampling sessions and unload its ephemeral adapters."""
        for sid in [s for s, v in self.sessions.items() if v.session_id == session_id]:
            del self.sessions[sid]
        ephemeral = [a for a, v in self.adapters.items() if v.owner_session == session_id and not v.disk_path]
        for adapter_id in ephemeral:
            del self.adapters[adapter_id]
            try:
                await self.workers.engine_broadcast(lambda: EngineUnloadAdapterReq(adapter_id=adapter_id))
            except (RemoteError, WorkerFailure) as exc:
                log.warning("unloading %s failed: %s", adapter_id, exc)

    # -- samples ------------------------------------------------------------------------

    def submit(self, req: SampleReq) -> SubmitResp:
        session = self.session_info(req.sampling_session_id)
        key = (req.sampling_session_id, req.seq_id)
        if key in self._requests:  # a retry of a submission whose answer got lost
            return self._requests[key][1]
        request_id = self.futures.create("sample")
        resp = SubmitResp(request_id=request_id, sample_sequence_ids=[
            f"{req.sampling_session_id}:{req.seq_id}:{i}" for i in range(req.num_samples)])
        self._requests[key] = (time.monotonic(), resp)
        engine_req = EngineSampleReq(
            adapter_id=session.adapter_id, prompt_tokens=req.prompt_tokens, num_samples=req.num_samples,
            params=req.params, prompt_logprobs=req.prompt_logprobs, topk_prompt_logprobs=req.topk_prompt_logprobs)
        task = asyncio.get_running_loop().create_task(self._sample(request_id, engine_req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return resp

    async def _sample(self, request_id: str, engine_req: EngineSampleReq) -> None:
        try:
            try:
                resp = await self.workers.engine_call(engine_req)
            except RemoteError as exc:
                adapter = self.adapters.get(engine_req.adapter_id or "")
                if exc.status != 410 or adapter is None or not adapter.disk_path:
                    raise
                # an engine evicted this snapshot to make room; it is on disk, so reload it
                await self._load_from_disk(engine_req.adapter_id, adapter.disk_path)
                resp = await self.workers.engine_call(engine_req)
        except RemoteError as exc:
            self.futures.fail(request_id, exc.detail, category_for(exc.status))
        except WorkerFailure as exc:
            self.futures.fail(request_id, str(exc), "server")
        except Exception as exc:
            log.exception("sample failed")
            self.futures.fail(request_id, f"internal error: {exc}", "server")
        else:
            self.futures.resolve(request_id, resp.result)

    def sweep(self) -> None:
        cutoff = time.monotonic() - _REQUEST_MEMORY_S
        for key in [k for k, (t, _) in self._requests.items() if t < cutoff]:
            del self._requests[key]
