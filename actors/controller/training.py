"""Training runs: LoRA adapters living in trainer slots, and the executor of clock cycles.

Submissions are checked and answered at once (a request_id); each run's SeqLedger
releases them in seq_id order into the run's own queue, and the cycle scheduler
(cycles.py) picks what the trainer runs next: one pass for the ready forward_backwards
of many runs (each with its adapter slot), one call for their optim_steps, or one
barrier request alone. A single executor task runs the cycles in turn; each is a fan-out
to every trainer rank and a barrier on all replies (trainer_calls.py builds the
messages and merges the replies). Exports and saves are collectives on every rank,
answered for by EXPORTING_RANK.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from actors.controller.checkpoints import expiry_for
from actors.controller.cycles import PASS, Cycle, CycleScheduler
from actors.controller.errors import ApiError, failure_of
from actors.controller.futures import FutureStore
from actors.controller.ledger import SeqLedger
from actors.controller.recovery import RunJournal, forget_snapshots, snapshot_root
from actors.controller.residency import Residency
from actors.controller.stability import StabilityRecords
from actors.controller.store import StateStore
from actors.controller.trainer_calls import optim_outcomes, optim_request, pass_outcomes, pass_requests
from actors.controller.workers import TrainerGroupDied, TrainerGroupLost, WorkerPool
from cluster.config import ClusterConfig
from cluster.parallel import EXPORTING_RANK
from cluster.messages import (
    Caller, CreateModelReq, ForwardBackwardReq, ForwardBackwardResult, JsonResult, LoadWeightsReq, OptimStepReq,
    SaveWeightsExternalReq, SaveWeightsForSamplerReq, SaveWeightsReq, SubmitResp, TrainerCreateAdapterReq,
    TrainerDropAdapterReq, TrainerLoadStateReq, TrainerPushAdapterReq,
    TrainerSaveStateReq,
)

log = logging.getLogger(__name__)
# A checkpoint name is one directory name under its run's kind directory: it starts with a
# letter or digit (so never "." or ".."), has no "/", and does not end in the suffixes the
# trainer's atomic writer gives its work directories (<name>.tmp, <name>.old), which
# saving another checkpoint would otherwise remove.
_CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WRITER_SUFFIXES = (".tmp", ".old")
# a run whose requests were in flight when the trainer group died this many times in a row is not rebuilt again
# (its own batch may be what kills the ranks): its requests fail, naming its latest checkpoint, and the launcher's
# restarts (3 by default) are not all spent on it
RUN_REBUILD_ATTEMPTS = 2


@dataclass
class TrainingRun:
    model_id: str
    session_id: str
    user: str
    base_model: str
    lora: Any  # LoraSpec, with the seed filled in
    slot: int
    create_request_id: str
    ledger: SeqLedger = field(default_factory=SeqLedger)
    queued: int = 0  # its ops in the executor's queue or running
    dropped: str = ""  # why an administrator dropped it: its queued ops fail with this
    journal: RunJournal = field(default_factory=RunJournal)  # how to rebuild it (actors/controller/recovery.py)


@dataclass
class _Op:
    run: TrainingRun
    request_id: str
    req: Any


@dataclass
class DropRunOp:
    """Internal op: free the run's slot once everything queued before it has run."""


class TrainingService:
    def __init__(self, config: ClusterConfig, workers: WorkerPool, futures: FutureStore,
                 store: StateStore, sampling, stability: StabilityRecords, started_at: float,
                 residency: Residency | None = None):
        self.config = config
        self.residency = residency or Residency(config.controller)
        self.started_at = started_at  # unix time this controller started: older runs lost their adapters
        self.workers = workers
        self.futures = futures
        self.store = store
        self.sampling = sampling
        self.stability = stability
        self._stable_reinforce_sessions: set[str] = set()  # the notice is logged once per session
        self.runs: dict[str, TrainingRun] = {}
        self.dropped: dict[str, str] = {}  # model_id -> why an administrator dropped it (for the 410)
        self.free_slots = list(range(config.trainer.max_adapters, 0, -1))
        self.cycles = CycleScheduler(config.trainer.max_tokens_per_pass, dp=config.trainer.parallel_dims().dp)

    # -- submission ---------------------------------------------------------------------

    def run_for(self, model_id: str, caller: Caller) -> TrainingRun:
        """The caller's live run `model_id`; 404 if it is not theirs, 410 if it is gone."""
        run = self.runs.get(model_id)
        if run is None:
            raise self._gone(model_id, caller)
        if not caller.owns(run.user):
            raise _unknown_model(model_id)
        return run

    def _gone(self, model_id: str, caller: Caller) -> ApiError:
        """Why there is no live run for model_id: never was, the server restarted, or its session ended."""
        row = self.store.training_run(model_id)
        if row is None or not caller.owns(row["user"]):
            return _unknown_model(model_id)
        hint = self._resume_hint(model_id)
        if row["created"] < self.started_at:
            return ApiError(410, f"model {model_id!r} is gone: the server restarted after it was created, and a "
                                 f"run's adapter lives in memory only; {hint}")
        if model_id in self.dropped:
            return ApiError(410, f"model {model_id!r} is gone: {self.dropped[model_id]}; {hint}")
        reason = row["finish_reason"] or "finished"
        why = "expired (no heartbeat)" if reason == "expired" else f"finished ({reason})"
        return ApiError(410, f"model {model_id!r} is gone: its session {row['session_id']} {why}; {hint}")

    def _resume_hint(self, model_id: str) -> str:
        hint = "resume from a checkpoint with ServiceClient.create_training_client_from_state(<tinker path>)"
        latest = self.store.latest_checkpoint(model_id, "weights")
        return hint + (f"; its latest training checkpoint is {latest['tinker_path']}" if latest else
                       " (this run saved no training checkpoint)")

    def _check_training_available(self) -> None:
        if self.workers.training_unavailable:  # the trainer group is gone for good; a restarting one queues
            raise ApiError(503, self.workers.training_unavailable)

    def create(self, req: CreateModelReq, user: str) -> SubmitResp:
        """A new run in the caller's session `req.session_id` (its owner is `user`)."""
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        if model_id in self.runs:  # the SDK retried a create whose answer got lost
            return SubmitResp(request_id=self.runs[model_id].create_request_id, model_id=model_id)
        self._check_training_available()
        self._check_base_model(req.base_model)
        self._check_lora(req.lora)
        spec = replace(req.lora, seed=req.lora.seed if req.lora.seed is not None else random.randrange(2**31))
        run = self._new_run(model_id, req.session_id, user, spec, req.user_metadata)
        self._enqueue(_Op(run, run.create_request_id, replace(req, lora=spec)))
        return SubmitResp(request_id=run.create_request_id, model_id=model_id)

    def create_from_state(self, req: LoadWeightsReq, user: str) -> SubmitResp:
        """`create_training_client_from_state`: the load is the new model's seq 0."""
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        if model_id in self.runs:
            return SubmitResp(request_id=self.runs[model_id].create_request_id, model_id=model_id)
        self._check_training_available()
        self._loadable_checkpoint(req)
        run = self._new_run(model_id, req.session_id, user, None, req.user_metadata)
        self._enqueue(_Op(run, run.create_request_id, req))
        return SubmitResp(request_id=run.create_request_id, model_id=model_id)

    def _new_run(self, model_id: str, session_id: str, user: str, spec, user_metadata: dict) -> TrainingRun:
        self._check_user_quota(user)
        if not self.free_slots:
            # 400, not 503: the SDK retries a 503 silently for minutes, which looks like a hang
            raise ApiError(400, f"all {self.config.trainer.max_adapters} adapter slots are in use; "
                                "finish a session or start tinkerd with a larger --max-adapters")
        request_id = self.futures.create("create_model", user)
        run = TrainingRun(model_id, session_id, user, self.config.model.name, spec, self.free_slots.pop(),
                          request_id)
        self.runs[model_id] = run
        self.store.add_training_run(model_id, session_id, user, run.base_model, vars(spec) if spec else {},
                                    user_metadata)
        return run

    def _check_user_quota(self, user: str) -> None:
        limit = self.config.controller.max_adapters_per_user
        held = sum(1 for r in self.runs.values() if r.user == user)
        if limit is not None and held >= limit:
            # 429: the SDK retries it (for up to 5 minutes), and a slot of this user's may free up meanwhile
            raise ApiError(429, f"user {user!r} already holds {held} training runs, the most "
                                f"--max-adapters-per-user={limit} allows; finish one of your sessions (or let it "
                                "expire) to free an adapter slot")

    def submit(self, req: ForwardBackwardReq | OptimStepReq | SaveWeightsForSamplerReq | SaveWeightsReq
               | SaveWeightsExternalReq | LoadWeightsReq) -> SubmitResp:
        run = self.run_for(req.model_id, req.caller)
        existing = run.ledger.known_request(req.seq_id)
        if existing is not None:
            return SubmitResp(request_id=existing, model_id=run.model_id)
        if req.seq_id < 1:
            raise ApiError(400, f"seq_id must be >= 1 (0 is the model's creation), got {req.seq_id}")
        self._check_training_available()
        try:
            req = self._checked_request(run, req)
        except ApiError:
            self.skip(run, req.seq_id)
            raise
        request_id = self.futures.create(type(req).__name__, run.user)
        for op in run.ledger.submit(req.seq_id, request_id, _Op(run, request_id, req)):
            self._enqueue(op)
        self.store.touch_training_run(run.model_id)
        return SubmitResp(request_id=request_id, model_id=run.model_id)

    def _checked_request(self, run: TrainingRun, req):
        """The request as it will run, once everything checkable at submission is checked."""
        if isinstance(req, ForwardBackwardReq) and req.provenance is not None:
            self._notice_stable_reinforce(run)
            req = replace(req, batch=self.stability.training_batch(run.session_id, run.user, req), provenance=None)
        elif isinstance(req, SaveWeightsForSamplerReq):
            self._check_save(run, req)
        elif isinstance(req, SaveWeightsReq):
            self._check_name(req.name)
            self._check_not_saved(self._weights_path(run, req.name), req.overwrite)
        elif isinstance(req, SaveWeightsExternalReq):
            self._check_name(req.name)
            self._check_not_saved(self._external_path(run, req.name), overwrite=False)
        elif isinstance(req, LoadWeightsReq):
            self._loadable_checkpoint(req)
        return req

    def _notice_stable_reinforce(self, run: TrainingRun) -> None:
        if run.session_id not in self._stable_reinforce_sessions:
            self._stable_reinforce_sessions.add(run.session_id)
            log.warning("session %s trains with stable_reinforce: tinkerd's own objective (truncated-IS REINFORCE "
                        "with IcePop masking on the sampler logprobs it recorded; README 'stable_reinforce'), not "
                        "Thinking Machines' unpublished one, so results will differ from the hosted service's",
                        run.session_id)

    def skip(self, run: TrainingRun, seq_id: int) -> None:
        """A refused submission still spent its seq_id: let the requests after it run."""
        for op in run.ledger.skip(seq_id):
            self._enqueue(op)

    def release_session(self, session_id: str) -> None:
        for run in [r for r in self.runs.values() if r.session_id == session_id]:
            self._retire(run, "the session finished before this request could run")

    def kill_run(self, run: TrainingRun, reason: str) -> None:
        """Drop a run at once (the admin probe, or a run that cannot be rebuilt): its requests fail, its slot frees."""
        run.dropped = self.dropped[run.model_id] = reason
        self._retire(run, reason)

    def _retire(self, run: TrainingRun, reason: str) -> None:
        """Fail the run's requests still waiting for a gap, and free its slot after what is queued."""
        for op in run.ledger.drain():
            self.futures.fail(op.request_id, reason, "user")
        self._enqueue(_Op(run, "", DropRunOp()))
        del self.runs[run.model_id]

    def queue_depth(self, run: TrainingRun) -> int:
        """Its requests not yet done: queued or running, or waiting for an earlier seq_id."""
        return run.queued + len(run.ledger.drain_preview())

    def _enqueue(self, op: "_Op") -> None:
        op.run.queued += 1
        self.cycles.put(op)

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
            self._check_name(req.name)
            self._check_not_saved(self._sampler_path(run, req.name), overwrite=False)

    @staticmethod
    def _check_name(name: str) -> None:
        if not _CHECKPOINT_NAME.match(name) or name.endswith(_WRITER_SUFFIXES):
            raise ApiError(400, f"checkpoint name {name!r} must match {_CHECKPOINT_NAME.pattern} and not end in "
                                f"{' or '.join(_WRITER_SUFFIXES)}")

    def _check_not_saved(self, tinker_path: str, overwrite: bool) -> None:
        # 400 rather than Tinker's 409: the SDK retries a 409 for minutes before showing it
        if not overwrite and self.store.checkpoint(tinker_path):
            raise ApiError(400, f"checkpoint {tinker_path} already exists (pass overwrite=True to replace it)")

    def _loadable_checkpoint(self, req: LoadWeightsReq) -> dict:
        """The checkpoint to load: the caller's own, or a published one."""
        checkpoint = self.store.checkpoint(req.path)
        if checkpoint is None or not (checkpoint["public"] or req.caller.owns(checkpoint["user"])):
            raise ApiError(404, f"no checkpoint at {req.path!r}")
        if req.with_optimizer and checkpoint["kind"] != "weights":
            raise ApiError(400, f"{req.path} is a {checkpoint['kind']} checkpoint without optimizer state; "
                                "load it without the optimizer, or save one with save_state")
        return checkpoint

    @staticmethod
    def _sampler_path(run: TrainingRun, name: str) -> str:
        return f"tinker://{run.model_id}/sampler_weights/{name}"

    @staticmethod
    def _weights_path(run: TrainingRun, name: str) -> str:
        return f"tinker://{run.model_id}/weights/{name}"

    @staticmethod
    def _external_path(run: TrainingRun, name: str) -> str:
        return f"tinker://{run.model_id}/external_weights/{name}"

    def _checkpoint_dir(self, run: TrainingRun, kind: str, name: str) -> str:
        return str(self.config.checkpoint_dir / run.model_id / kind / name)

    # -- execution ----------------------------------------------------------------------

    async def _trainer_fan_out(self, reqs: list) -> list:
        # colocated: waits while the engines hold the devices (residency.py); dedicated: no-op
        async with self.residency.training():
            return await self.workers.trainer_fan_out(reqs)

    async def _trainer_broadcast(self, make_req) -> list:
        async with self.residency.training():
            return await self.workers.trainer_broadcast(make_req)

    async def run_executor(self) -> None:
        while True:
            cycle = await self.cycles.next_cycle()
            try:
                await self._execute_cycle(cycle)
            finally:
                for op in cycle.ops:
                    op.run.queued -= 1

    async def _execute_cycle(self, cycle: Cycle) -> None:
        live = [op for op in cycle.ops if not self._failed_if_dropped(op)]
        if len(live) == 1:
            await self._execute(live[0])
        elif live:
            await self._execute_shared(cycle.kind, live)

    def _failed_if_dropped(self, op: "_Op") -> bool:
        """A dropped run's queued requests fail with the reason (its DropRunOp still frees the slot)."""
        if op.run.dropped and not isinstance(op.req, DropRunOp):
            self.futures.fail(op.request_id, op.run.dropped, "user")
            return True
        return False

    async def _execute(self, op: "_Op") -> None:
        if self._failed_if_dropped(op):  # also when a shared cycle falls back to one by one
            return
        try:
            result = await self._run_rebuilding(op.run, op.req)
        except Exception as exc:
            self._failed(op, *failure_of(exc, type(op.req).__name__))
        else:
            self.futures.resolve(op.request_id, result)

    async def _execute_shared(self, kind: str, ops: list["_Op"]) -> None:
        """Several runs' requests in one trainer call. If the group dies meanwhile, nobody knows whose batch
        killed it: once the new group is up, each request runs alone (rebuilt as need be), so only the run
        that kills the group again is given up."""
        try:
            for run in {id(op.run): op.run for op in ops}.values():
                await self._ensure_built(run)
            started = time.monotonic()
            work = [(op.run.slot, op.req) for op in ops]
            outcomes = await (self._pass(work) if kind == PASS else self._optim(work))
        except TrainerGroupDied as exc:
            log.warning("a shared %s of %d requests: %s; running them one by one on the restarted group", kind,
                        len(ops), exc)
            try:
                await self.workers.wait_for_trainers()
            except TrainerGroupLost:
                pass  # each request fails below with the reason
            for op in ops:
                await self._execute(op)
            return
        except Exception as exc:
            for op in ops:
                self._failed(op, *failure_of(exc, type(op.req).__name__))
            return
        elapsed = (time.monotonic() - started) / len(ops)
        for op, outcome in zip(ops, outcomes):
            if isinstance(outcome, ApiError):
                self._failed(op, *failure_of(outcome, type(op.req).__name__))
                continue
            result = outcome if kind == PASS else JsonResult(payload={"metrics": outcome})
            await self._recorded(op.run, op.req, elapsed)
            self.futures.resolve(op.request_id, result)

    async def _run_rebuilding(self, run: TrainingRun, req: Any) -> Any:
        """Run `req`; if the trainer group dies meanwhile, wait for the new one, rebuild the run and run it again."""
        if isinstance(req, DropRunOp):
            return await self.execute_DropRunOp(run, req)
        handler = getattr(self, f"execute_{type(req).__name__}")
        while True:
            try:
                await self._ensure_built(run)
                started = time.monotonic()
                result = await handler(run, req)
            except TrainerGroupDied as exc:
                run.journal.deaths += 1
                if run.journal.deaths >= RUN_REBUILD_ATTEMPTS:
                    self._give_up(run, f"the trainer group died {run.journal.deaths} times in a row while this "
                                       f"run's requests ran (last: {exc}), so tinkerd stopped rebuilding it")
                    raise ApiError(500, f"{run.dropped}; {self._resume_hint(run.model_id)}") from None
                log.warning("run %s: %s; waiting for the restarted trainer group to run %s again", run.model_id,
                            exc, type(req).__name__)
                try:
                    await self.workers.wait_for_trainers()
                except TrainerGroupLost as lost:
                    raise TrainerGroupLost(f"{lost}; {self._resume_hint(run.model_id)}") from None
                continue
            await self._recorded(run, req, time.monotonic() - started)
            return result

    async def _recorded(self, run: TrainingRun, req: Any, elapsed_s: float) -> None:
        """`req` ran: into the run's replay log, and a snapshot if one is due (recovery.py)."""
        run.journal.record(req, elapsed_s, self.workers.group.generation)
        if run.journal.snapshot_due(self.config.controller.snapshot_budget):
            await self._snapshot(run)

    async def _ensure_built(self, run: TrainingRun) -> None:
        """A run built on an earlier trainer group (one that died) is rebuilt on this one first."""
        if run.journal.generation not in (0, self.workers.group.generation):
            await self._rebuild(run)

    async def _rebuild(self, run: TrainingRun) -> None:
        """Bring the run's adapter back in a new trainer group: its snapshot, then its replay log, in order."""
        journal, started = run.journal, time.monotonic()
        if journal.snapshot:
            seed = run.lora.seed if run.lora is not None else None
            await self._trainer_broadcast(lambda: TrainerLoadStateReq(
                slot=run.slot, directory=journal.snapshot, with_optimizer=True, seed=seed))
        for logged in journal.log:
            await getattr(self, f"execute_{type(logged).__name__}")(run, logged)
        journal.generation = self.workers.group.generation
        log.warning("run %s rebuilt in trainer generation %d: %s + %d replayed request(s) in %.0f ms", run.model_id,
                    journal.generation, "snapshot" if journal.snapshot else "no snapshot", len(journal.log),
                    (time.monotonic() - started) * 1e3)

    async def _snapshot(self, run: TrainingRun) -> None:
        """Write the run's state for a rebuild; if that fails the log just grows, so the step stands."""
        directory = run.journal.next_snapshot_dir(snapshot_root(self.config.state_dir, run.model_id))
        started = time.monotonic()
        try:
            await self._trainer_broadcast(
                lambda: TrainerSaveStateReq(slot=run.slot, directory=directory, with_optimizer=True))
        except Exception as exc:  # the trainer died meanwhile, or the disk is full: the replay log still has it
            log.warning("run %s: snapshot into %s failed (%s); its replay log keeps growing", run.model_id,
                        directory, exc)
            return
        run.journal.snapshot_taken(directory, time.monotonic() - started)

    def _give_up(self, run: TrainingRun, reason: str) -> None:
        log.error("run %s (user %s): %s", run.model_id, run.user, reason)
        if self.runs.get(run.model_id) is run:
            self.kill_run(run, reason)

    def _failed(self, op: _Op, error: str, category: str) -> None:
        self.futures.fail(op.request_id, error, category)
        if op.request_id == op.run.create_request_id and self.runs.get(op.run.model_id) is op.run:
            # a model that never came to be: forget it and give its slot back
            del self.runs[op.run.model_id]
            self.free_slots.append(op.run.slot)
            self.cycles.forget_run(op.run.model_id)
            self.store.forget_training_run(op.run.model_id)

    async def execute_CreateModelReq(self, run: TrainingRun, req: CreateModelReq) -> JsonResult:
        await self._trainer_broadcast(lambda: TrainerCreateAdapterReq(slot=run.slot, lora=run.lora))
        return JsonResult(payload={"model_id": run.model_id})

    async def execute_ForwardBackwardReq(self, run: TrainingRun, req: ForwardBackwardReq) -> ForwardBackwardResult:
        return _raised((await self._pass([(run.slot, req)]))[0])

    async def execute_OptimStepReq(self, run: TrainingRun, req: OptimStepReq) -> JsonResult:
        return JsonResult(payload={"metrics": _raised((await self._optim([(run.slot, req)]))[0])})

    async def _pass(self, work: list[tuple[int, ForwardBackwardReq]]) -> list[ForwardBackwardResult | ApiError]:
        dims = self.workers.dims
        return pass_outcomes(dims, await self._trainer_fan_out(pass_requests(dims, work)))

    async def _optim(self, work: list[tuple[int, OptimStepReq]]) -> list[dict | ApiError]:
        replies = await self._trainer_broadcast(lambda: optim_request(work))
        return optim_outcomes(self.workers.dims, replies)

    async def execute_SaveWeightsForSamplerReq(self, run: TrainingRun, req: SaveWeightsForSamplerReq) -> JsonResult:
        save_dir = None
        if req.name is not None:
            adapter_id = self._sampler_path(run, req.name)
            save_dir = self._checkpoint_dir(run, "sampler_weights", req.name)
        else:  # an ephemeral snapshot: a new immutable adapter, never written to disk
            adapter_id = f"{run.model_id}@{req.seq_id}"
        addresses = self.workers.engine_weights_addresses
        replies = await self._trainer_broadcast(lambda: TrainerPushAdapterReq(
            slot=run.slot, adapter_id=adapter_id, engine_addresses=addresses, save_dir=save_dir))
        self.sampling.adapter_loaded(adapter_id, owner_session=run.session_id, disk_path=save_dir)
        if req.name is not None:
            self.store.add_checkpoint(adapter_id, run.model_id, run.user, "sampler_weights", req.name, save_dir,
                                      replies[EXPORTING_RANK].size_bytes, expiry_for(req.ttl_seconds),
                                      req.user_metadata)
            return JsonResult(payload={"path": adapter_id})
        sampling_session_id = self.sampling.add_session(
            run.session_id, run.user, req.sampling_session_seq_id, run.base_model, adapter_id, model_path=None)
        return JsonResult(payload={"path": None, "sampling_session_id": sampling_session_id})

    async def execute_SaveWeightsReq(self, run: TrainingRun, req: SaveWeightsReq) -> JsonResult:
        path = self._weights_path(run, req.name)
        self._check_not_saved(path, req.overwrite)  # again: an earlier queued save may have taken it
        directory = self._checkpoint_dir(run, "weights", req.name)
        replies = await self._trainer_broadcast(
            lambda: TrainerSaveStateReq(slot=run.slot, directory=directory, with_optimizer=True))
        self.store.add_checkpoint(path, run.model_id, run.user, "weights", req.name, directory,
                                  replies[EXPORTING_RANK].size_bytes, expiry_for(req.ttl_seconds), req.user_metadata)
        return JsonResult(payload={"path": path})

    async def execute_SaveWeightsExternalReq(self, run: TrainingRun, req: SaveWeightsExternalReq) -> JsonResult:
        """The adapter alone in Hugging Face PEFT form (adapter_model.safetensors + adapter_config.json)."""
        path = self._external_path(run, req.name)
        self._check_not_saved(path, overwrite=False)
        directory = self._checkpoint_dir(run, "external_weights", req.name)
        replies = await self._trainer_broadcast(lambda: TrainerPushAdapterReq(
            slot=run.slot, adapter_id=path, engine_addresses=[], save_dir=directory))
        size_bytes = replies[EXPORTING_RANK].size_bytes
        self.store.add_checkpoint(path, run.model_id, run.user, "external_weights", req.name, directory,
                                  size_bytes, expiry_for(req.ttl_seconds))
        return JsonResult(payload={"path": path, "size_bytes": size_bytes})

    async def execute_LoadWeightsReq(self, run: TrainingRun, req: LoadWeightsReq) -> JsonResult:
        checkpoint = self._loadable_checkpoint(req)
        seed = run.lora.seed if run.lora is not None else None
        replies = await self._trainer_broadcast(lambda: TrainerLoadStateReq(
            slot=run.slot, directory=checkpoint["directory"], with_optimizer=req.with_optimizer, seed=seed))
        run.lora = replies[EXPORTING_RANK].lora  # every rank read the same checkpoint
        self.store.set_training_run_lora(run.model_id, vars(run.lora))
        return JsonResult(payload={"path": req.path, "model_id": run.model_id})

    async def execute_DropRunOp(self, run: TrainingRun, req: DropRunOp) -> None:
        try:
            group = self.workers.group
            if group.state == "ready" and run.journal.generation == group.generation:  # else it died with a group
                await self._trainer_broadcast(lambda: TrainerDropAdapterReq(slot=run.slot))
        finally:
            self.free_slots.append(run.slot)
            self.cycles.forget_run(run.model_id)
            forget_snapshots(self.config.state_dir, run.model_id)


def _raised(outcome):
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


def _unknown_model(model_id: str) -> ApiError:
    return ApiError(404, f"unknown model_id {model_id!r}")
