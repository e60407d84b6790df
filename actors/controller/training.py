"""Training runs: LoRA adapters living in trainer slots, and the step executor.

Submissions are checked and answered at once (a request_id); the run's SeqLedger
releases them in seq_id order into one FIFO, and a single executor task runs them:
each step is a fan-out to every trainer rank and a barrier on all replies. Data
parallel ranks get contiguous shards of the datums; their outputs are concatenated
back in datum order and their metrics merged by reduction suffix.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from actors.controller.errors import ApiError, category_for
from actors.controller.futures import FutureStore
from actors.controller.ledger import SeqLedger
from actors.controller.store import StateStore
from actors.controller.workers import WorkerFailure, WorkerPool
from cluster.config import ClusterConfig
from cluster.messages import (
    CreateModelReq, ForwardBackwardReq, ForwardBackwardResult, JsonResult, OptimStepReq,
    SaveWeightsForSamplerReq, SubmitResp, TrainerCreateAdapterReq, TrainerDropAdapterReq,
    TrainerForwardBackwardReq, TrainerOptimStepReq, TrainerPushAdapterReq,
)
from cluster.transport import RemoteError

log = logging.getLogger(__name__)
_CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass
class TrainingRun:
    model_id: str
    session_id: str
    base_model: str
    lora: Any  # LoraSpec, with the seed filled in
    slot: int
    create_request_id: str
    ledger: SeqLedger = field(default_factory=SeqLedger)


@dataclass
class _Op:
    run: TrainingRun
    request_id: str
    req: Any


@dataclass
class DropRunOp:
    """Internal op: free the run's slot once everything queued before it has run."""


def merge_metrics(shards: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Combine per-rank metrics as the SDK combines per-chunk ones (by key suffix)."""
    merged: dict[str, float] = {}
    keys = {k for metrics, _ in shards for k in metrics}
    for key in sorted(keys):
        present = [(m[key], n) for m, n in shards if key in m]
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            merged[key] = float(sum(v for v, _ in present))
        elif reduction == "mean":
            total = sum(n for _, n in present)
            merged[key] = float(sum(v * n for v, n in present) / total) if total else 0.0
        elif reduction == "min":
            merged[key] = float(min(v for v, n in present if n) if any(n for _, n in present) else 0.0)
        elif reduction == "max":
            merged[key] = float(max(v for v, n in present if n) if any(n for _, n in present) else 0.0)
        else:
            merged[key] = float(present[0][0])
    return merged


class TrainingService:
    def __init__(self, config: ClusterConfig, workers: WorkerPool, futures: FutureStore,
                 store: StateStore, sampling):
        self.config = config
        self.workers = workers
        self.futures = futures
        self.store = store
        self.sampling = sampling
        self.runs: dict[str, TrainingRun] = {}
        self.free_slots = list(range(config.trainer.max_adapters, 0, -1))
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()

    # -- submission ---------------------------------------------------------------------

    def run_for(self, model_id: str) -> TrainingRun:
        run = self.runs.get(model_id)
        if run is None:
            raise ApiError(404, f"unknown model_id {model_id!r}")
        return run

    def create(self, req: CreateModelReq) -> SubmitResp:
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        if model_id in self.runs:  # the SDK retried a create whose answer got lost
            return SubmitResp(request_id=self.runs[model_id].create_request_id, model_id=model_id)
        self._check_base_model(req.base_model)
        self._check_lora(req.lora)
        if not self.free_slots:
            raise ApiError(503, f"all {self.config.trainer.max_adapters} adapter slots are in use; "
                                "finish a session or start tinkerd with a larger --max-adapters")
        spec = replace(req.lora, seed=req.lora.seed if req.lora.seed is not None else random.randrange(2**31))
        request_id = self.futures.create("create_model")
        run = TrainingRun(model_id, req.session_id, self.config.model.name, spec, self.free_slots.pop(), request_id)
        self.runs[model_id] = run
        self.store.add_training_run(model_id, req.session_id, run.base_model, vars(spec), req.user_metadata)
        self._queue.put_nowait(_Op(run, request_id, replace(req, lora=spec)))
        return SubmitResp(request_id=request_id, model_id=model_id)

    def submit(self, req: ForwardBackwardReq | OptimStepReq | SaveWeightsForSamplerReq) -> SubmitResp:
        run = self.run_for(req.model_id)
        existing = run.ledger.known_request(req.seq_id)
        if existing is not None:
            return SubmitResp(request_id=existing, model_id=run.model_id)
        if req.seq_id < 1:
            raise ApiError(400, f"seq_id must be >= 1 (0 is the model's creation), got {req.seq_id}")
        if isinstance(req, SaveWeightsForSamplerReq):
            self._check_save(run, req)
        request_id = self.futures.create(type(req).__name__)
        for op in run.ledger.submit(req.seq_id, request_id, _Op(run, request_id, req)):
            self._queue.put_nowait(op)
        self.store.touch_training_run(run.model_id)
        return SubmitResp(request_id=request_id, model_id=run.model_id)

    def release_session(self, session_id: str) -> None:
        for run in [r for r in self.runs.values() if r.session_id == session_id]:
            for op in run.ledger.drain():
                self.futures.fail(op.request_id, "the session finished before this request could run", "user")
            self._queue.put_nowait(_Op(run, "", DropRunOp()))
            del self.runs[run.model_id]

    def _check_base_model(self, base_model: str) -> None:
        served = {self.config.model.name, self.config.model.path}
        if base_model not in served:
            raise ApiError(400, f"base_model {base_model!r} is not served here; this server serves "
                                f"{self.config.model.name!r}")

    def _check_lora(self, spec) -> None:
        rank, max_rank = spec.rank, self.config.trainer.max_lora_rank
        if rank < 1 or rank & (rank - 1):
            raise ApiError(400, f"LoRA rank must be a power of 2, got {rank}")
        if rank > max_rank:
            raise ApiError(400, f"LoRA rank {rank} exceeds this server's maximum of {max_rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise ApiError(400, "at least one of train_attn, train_mlp, train_unembed must be true")

    def _check_save(self, run: TrainingRun, req: SaveWeightsForSamplerReq) -> None:
        if req.name is None and req.sampling_session_seq_id is None:
            raise ApiError(400, "save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
        if req.name is not None:
            if not _CHECKPOINT_NAME.match(req.name):
                raise ApiError(400, f"checkpoint name {req.name!r} must match {_CHECKPOINT_NAME.pattern}")
            if self.store.checkpoint(self._sampler_path(run, req.name)):
                raise ApiError(400, f"checkpoint {self._sampler_path(run, req.name)} already exists")

    @staticmethod
    def _sampler_path(run: TrainingRun, name: str) -> str:
        return f"tinker://{run.model_id}/sampler_weights/{name}"

    # -- execution ----------------------------------------------------------------------

    async def run_executor(self) -> None:
        while True:
            op = await self._queue.get()
            handler = getattr(self, f"execute_{type(op.req).__name__}")
            try:
                result = await handler(op.run, op.req)
            except (ApiError, RemoteError) as exc:
                self.futures.fail(op.request_id, exc.detail, category_for(exc.status))
            except WorkerFailure as exc:
                self.futures.fail(op.request_id, str(exc), "server")
            except Exception as exc:
                log.exception("%s failed", type(op.req).__name__)
                self.futures.fail(op.request_id, f"internal error: {exc}", "server")
            else:
                self.futures.resolve(op.request_id, result)

    async def execute_CreateModelReq(self, run: TrainingRun, req: CreateModelReq) -> JsonResult:
        await self.workers.trainer_broadcast(lambda: TrainerCreateAdapterReq(slot=run.slot, lora=run.lora))
        return JsonResult(payload={"model_id": run.model_id})

    async def execute_ForwardBackwardReq(self, run: TrainingRun, req: ForwardBackwardReq) -> ForwardBackwardResult:
        ranks = self.workers.expected_trainers
        bounds = np.linspace(0, req.batch.num_datums, ranks + 1).astype(int)
        shards = [TrainerForwardBackwardReq(
            slot=run.slot, loss_fn=req.loss_fn, loss_fn_config=req.loss_fn_config,
            forward_only=req.forward_only, batch=req.batch.select(bounds[r], bounds[r + 1]))
            for r in range(ranks)]
        results = [resp.result for resp in await self.workers.trainer_fan_out(shards)]
        return ForwardBackwardResult(
            lengths=np.concatenate([r.lengths for r in results]),
            logprobs=np.concatenate([r.logprobs for r in results]),
            elementwise_loss=np.concatenate([r.elementwise_loss for r in results]),
            metrics=merge_metrics([(r.metrics, len(r.lengths)) for r in results]),
        )

    async def execute_OptimStepReq(self, run: TrainingRun, req: OptimStepReq) -> JsonResult:
        replies = await self.workers.trainer_broadcast(lambda: TrainerOptimStepReq(slot=run.slot, adam=req.adam))
        return JsonResult(payload={"metrics": replies[0].metrics})

    async def execute_SaveWeightsForSamplerReq(self, run: TrainingRun, req: SaveWeightsForSamplerReq) -> JsonResult:
        save_dir = None
        if req.name is not None:
            adapter_id = self._sampler_path(run, req.name)
            save_dir = str(self.config.checkpoint_dir / run.model_id / "sampler_weights" / req.name)
        else:  # an ephemeral snapshot: a new immutable adapter, never written to disk
            adapter_id = f"{run.model_id}@{req.seq_id}"
        addresses = self.workers.engine_weights_addresses
        replies = await self.workers.trainer_broadcast(lambda: TrainerPushAdapterReq(
            slot=run.slot, adapter_id=adapter_id, engine_addresses=addresses, save_dir=save_dir))
        self.sampling.adapter_loaded(adapter_id, owner_session=run.session_id, disk_path=save_dir)
        if req.name is not None:
            self.store.add_checkpoint(adapter_id, run.model_id, "sampler_weights", req.name, save_dir,
                                      replies[0].size_bytes)
            return JsonResult(payload={"path": adapter_id})
        sampling_session_id = self.sampling.add_session(
            run.session_id, req.sampling_session_seq_id, run.base_model, adapter_id, model_path=None)
        return JsonResult(payload={"path": None, "sampling_session_id": sampling_session_id})

    async def execute_DropRunOp(self, run: TrainingRun, req: DropRunOp) -> None:
        try:
            await self.workers.trainer_broadcast(lambda: TrainerDropAdapterReq(slot=run.slot))
        finally:
            self.free_slots.append(run.slot)
