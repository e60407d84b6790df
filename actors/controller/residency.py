"""Residency: who holds the devices when trainer ranks and engines share them (`--colocate`).

Without `--colocate` the mode is "dedicated": the gates below are null context managers
and nothing is ever switched. With it, the controller alternates two phases:

- "sampling": engines hold their weights and KV cache, the trainer is offloaded; every
  engine sample call (sampling.py) passes the sampling gate at once;
- "training": engines have released their memory, the trainer is onloaded; every trainer
  fan-out (training.py) passes the training gate at once.

A call whose phase is not the current one waits in its gate (it never fails for that).
The trainer loads its model onto the device, so the first sampling phase begins only
after the "start" transition's trainer_offload: a sample that comes sooner waits.
One driver task (`run`) switches phases, in the order slime/miles use:

    to training:  drain (no new samples are admitted; in-flight ones finish)
                  -> engine_release        EngineReleaseMemoryReq(kv_cache + weights) to every engine
                  -> trainer_onload        TrainerOnloadReq to every rank
    to sampling:  trainer_offload          TrainerOffloadReq to every rank
                  -> engine_resume_weights EngineResumeMemoryReq(["weights"])
                  -> (adapters pushed meanwhile are in the engines already: an engine keeps its LoRA
                     slots when it releases memory and accepts adapter loads while released)
                  -> engine_resume_kv_cache EngineResumeMemoryReq(["kv_cache"])

Each step is a fan-out that waits for every rank or engine (within the trainer timeout).

Policy: training phase lasts while the training queue was non-empty within the last
`training_linger_ms` (so a forward_backward + optim_step loop pays the barriers once, not
per request), and, while samples wait, at most `max_phase_ms` from when the first of them
started waiting. A sampling phase with training waiting ends once no sample is waiting or
in flight, or at most `max_phase_ms` after training started waiting. A phase that ends
lets the call in progress finish and admits no new one.

Failures: a failed step fails every call waiting for the phase being switched to, with an
error naming the barrier and the worker. Then the driver brings the cluster back to the
sampling phase (trainer offloaded, engines resumed: every step is idempotent, so steps that
had not happened are no-ops). If that recovery fails too, the state is "failed": every
gated call, waiting or new, fails at once with the cause, and tinkerd must be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable

from cluster.config import ControllerConfig
from cluster.errors import StatusError
from cluster.messages import EngineReleaseMemoryReq, EngineResumeMemoryReq, TrainerOffloadReq, TrainerOnloadReq

log = logging.getLogger(__name__)

SAMPLING, TRAINING, FAILED = "sampling", "training", "failed"
RELEASE_TAGS = ["kv_cache", "weights"]
BARRIER_LOG = 64  # barriers kept for ClusterStatusResp.residency
_NULL = contextlib.nullcontext()

# fan-outs: send one request (made by the callable) to every engine / rank; answer {worker name: reply}
FanOut = Callable[[Callable[[], Any]], Awaitable[dict[str, Any]]]


class ResidencyError(StatusError):
    """A gated call that cannot run: a barrier failed, or the residency state machine has failed."""

    def __init__(self, detail: str):
        super().__init__(503, detail)


class Residency:
    def __init__(self, config: ControllerConfig, engines: FanOut | None = None, trainers: FanOut | None = None,
                 barrier_timeout_s: float | None = None):
        self.colocated = bool(config.colocate)
        self.linger_s = config.training_linger_ms / 1000
        self.max_phase_s = config.max_phase_ms / 1000
        self.barrier_timeout_s = barrier_timeout_s
        self._engines, self._trainers = engines, trainers
        # colocated, the trainer holds the devices until the start's offload: nothing is admitted before it
        self.phase = f"to_{SAMPLING}" if self.colocated else SAMPLING
        self.admitting = not self.colocated  # the current phase still admits new calls
        self.failure: str | None = None
        self._last_error = ""
        self.switches = 0
        self.barriers: deque[dict] = deque(maxlen=BARRIER_LOG)
        self._waiters: dict[str, list[asyncio.Future]] = {SAMPLING: [], TRAINING: []}
        self._waiting_since: dict[str, float | None] = {SAMPLING: None, TRAINING: None}
        self._active = {SAMPLING: 0, TRAINING: 0}
        self._last_training = time.monotonic()  # the last time a training call ran or ended
        self._wake = asyncio.Event()
        self._rejoins: set[asyncio.Task] = set()
        self._to_training = (("engine_release", self._engine_step(EngineReleaseMemoryReq, RELEASE_TAGS)),
                             ("trainer_onload", self._trainer_step(TrainerOnloadReq)))
        self._to_sampling = (("trainer_offload", self._trainer_step(TrainerOffloadReq)),
                             ("engine_resume_weights", self._engine_step(EngineResumeMemoryReq, ["weights"])),
                             ("engine_resume_kv_cache", self._engine_step(EngineResumeMemoryReq, ["kv_cache"])))

    # -- gates ----------------------------------------------------------------------------

    def sampling(self):
        """`async with residency.sampling():` around one engine sample call."""
        return self._gate(SAMPLING) if self.colocated else _NULL

    def training(self):
        """`async with residency.training():` around one trainer fan-out."""
        return self._gate(TRAINING) if self.colocated else _NULL

    @contextlib.asynccontextmanager
    async def _gate(self, side: str):
        await self._enter(side)  # on return, _active[side] counts this call already
        if side == TRAINING:
            self._last_training = time.monotonic()
        try:
            yield
        finally:
            self._active[side] -= 1
            if side == TRAINING:
                self._last_training = time.monotonic()
            self._kick()

    async def _enter(self, side: str) -> None:
        if self.failure is not None:
            raise ResidencyError(self.failure)
        if self.phase == side and self.admitting:
            self._active[side] += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[side].append(waiter)
        if self._waiting_since[side] is None:
            self._waiting_since[side] = time.monotonic()
        self._kick()
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._active[side] -= 1  # admitted, but cancelled before it could run
                self._kick()
            raise
        finally:
            if waiter in self._waiters[side]:  # cancelled while waiting
                self._waiters[side].remove(waiter)
            if not self._waiters[side]:
                self._waiting_since[side] = None

    def _kick(self) -> None:
        self._wake.set()

    def _admit(self, side: str) -> None:
        """Enter phase `side`: admit its waiters, counted as active from now on (so the phase cannot end
        before they have run)."""
        self.phase, self.admitting = side, True
        waiters, self._waiters[side] = self._waiters[side], []
        self._waiting_since[side] = None
        if side == TRAINING:
            self._last_training = time.monotonic()
        for waiter in waiters:
            if not waiter.done():
                self._active[side] += 1
                waiter.set_result(None)

    def _fail_waiters(self, side: str, error: str) -> None:
        waiters, self._waiters[side] = self._waiters[side], []
        self._waiting_since[side] = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ResidencyError(error))

    # -- the driver -----------------------------------------------------------------------

    async def run(self, ready: Awaitable | None = None) -> None:
        """Switch phases for as long as the controller runs (colocated mode only)."""
        if not self.colocated:
            return
        if ready is not None:
            await ready
        # the trainer loaded its model onto the device: the first sampling phase begins once it has offloaded
        if not await self._run_steps("start", self._to_sampling[:1]):
            self._mark_failed("the initial trainer offload failed")
            return
        self._admit(SAMPLING)
        while self.failure is None:
            if self.phase == SAMPLING:
                await self._until(self._sampling_over)
                await self._switch(TRAINING)
            else:
                await self._until(self._training_over)
                await self._switch(SAMPLING)

    def _sampling_over(self, now: float) -> tuple[bool, float | None]:
        """(time to switch to training?, when to look again at the latest)."""
        since = self._waiting_since[TRAINING]
        if since is None:
            return False, None
        idle = not self._waiters[SAMPLING] and self._active[SAMPLING] == 0
        deadline = since + self.max_phase_s
        return idle or now >= deadline, deadline

    def _training_over(self, now: float) -> tuple[bool, float | None]:
        busy = bool(self._waiters[TRAINING]) or self._active[TRAINING] > 0
        linger_end = None if busy else self._last_training + self.linger_s
        if linger_end is not None and now >= linger_end:
            return True, None
        since = self._waiting_since[SAMPLING]
        deadline = None if since is None else since + self.max_phase_s
        if deadline is not None and now >= deadline:
            return True, None
        return False, min((t for t in (linger_end, deadline) if t is not None), default=None)

    async def _until(self, over: Callable[[float], tuple[bool, float | None]]) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            done, deadline = over(now)
            if done:
                return
            timeout = None if deadline is None else max(0.0, deadline - now)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _drain(self, side: str) -> None:
        """Stop admitting calls of `side` and wait for those in progress to finish."""
        self.admitting = False
        while self._active[side]:
            self._wake.clear()
            await self._wake.wait()

    async def _switch(self, target: str) -> None:
        self.switches += 1
        leaving = SAMPLING if target == TRAINING else TRAINING
        start = time.time()
        began = time.monotonic()
        await self._drain(leaving)
        self._record(f"to_{target}", "drain", start, began, None, {})
        self.phase = f"to_{target}"
        steps = self._to_training if target == TRAINING else self._to_sampling
        if await self._run_steps(f"to_{target}", steps, target):
            self._admit(target)
        else:
            await self._recover()

    async def _run_steps(self, transition: str, steps, target: str | None = None) -> bool:
        """Run barrier steps in order; on the first failure, fail `target`'s waiters and return False."""
        for name, step in steps:
            error = await self._barrier(transition, name, step)
            if error is not None:
                log.error("%s", error)
                if target is not None:
                    self._fail_waiters(target, error)
                self._last_error = error
                return False
        return True

    async def _recover(self) -> None:
        """After a failed step: back to the sampling phase with everything resumed, or "failed"."""
        cause = self._last_error
        self.phase = "recovering"
        if await self._run_steps("recover", self._to_sampling):
            log.warning("residency recovered to the sampling phase after: %s", cause)
            self._admit(SAMPLING)
        else:
            self._mark_failed(f"{cause}; recovering to the sampling phase failed too: {self._last_error}")

    def _mark_failed(self, error: str) -> None:
        self.failure = f"residency failed: {error}; tinkerd must be restarted"
        self.phase = FAILED
        self.admitting = False
        log.error("%s", self.failure)
        for side in (SAMPLING, TRAINING):
            self._fail_waiters(side, self.failure)

    async def _barrier(self, transition: str, name: str, step: Callable[[], Awaitable[dict]]) -> str | None:
        """Run one step; record it; return None, or the error that names the barrier and the worker."""
        start, began = time.time(), time.monotonic()
        memory, error = {}, None
        try:
            replies = await asyncio.wait_for(step(), self.barrier_timeout_s)
            memory = {worker: dict(getattr(resp, "memory", {}) or {}) for worker, resp in replies.items()}
        except asyncio.TimeoutError:
            error = f"residency barrier {name!r} ({transition}) failed: no answer within {self.barrier_timeout_s:g} s"
        except Exception as exc:
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            error = f"residency barrier {name!r} ({transition}) failed: {detail}"
        self._record(transition, name, start, began, error, memory)
        return error

    def _record(self, transition: str, name: str, start: float, began: float, error: str | None,
                memory: dict) -> None:
        self.barriers.append({"transition": transition, "name": name, "start": start,
                              "duration_ms": round((time.monotonic() - began) * 1000, 3),
                              "ok": error is None, "error": error, "memory": memory})

    def engine_joined(self, release_it: FanOut) -> None:
        """An engine said hello (a restart, or a late start) holding its memory. In a training phase (or on the
        way to one) the trainer holds the devices, so it releases at once, recorded as barrier "engine_release"
        of transition "rejoin"; had it failed, the engine keeps its memory until the next switch resumes it."""
        if self.colocated and self.phase in (TRAINING, f"to_{TRAINING}"):
            step = self._engine_step(EngineReleaseMemoryReq, RELEASE_TAGS, release_it)
            task = asyncio.get_running_loop().create_task(self._barrier("rejoin", "engine_release", step))
            self._rejoins.add(task)
            task.add_done_callback(self._rejoins.discard)

    def trainer_joined(self) -> None:
        """A restarted trainer group said hello holding the devices. In a sampling phase the engines hold them, so
        it offloads at once, recorded as barrier "trainer_offload" of transition "rejoin"."""
        if self.colocated and self.phase in (SAMPLING, f"to_{SAMPLING}"):
            task = asyncio.get_running_loop().create_task(
                self._barrier("rejoin", "trainer_offload", self._trainer_step(TrainerOffloadReq)))
            self._rejoins.add(task)
            task.add_done_callback(self._rejoins.discard)

    # -- steps ----------------------------------------------------------------------------

    def _engine_step(self, message: type, tags: list[str], engines: FanOut | None = None
                     ) -> Callable[[], Awaitable[dict]]:
        return lambda: (engines or self._engines)(lambda: message(tags=list(tags)))

    def _trainer_step(self, message: type) -> Callable[[], Awaitable[dict]]:
        return lambda: self._trainers(message)

    # -- status ---------------------------------------------------------------------------

    def describe(self, last: int = BARRIER_LOG) -> dict[str, Any]:
        if not self.colocated:
            return {"mode": "dedicated"}
        return {"mode": "colocated", "phase": self.phase, "admitting": self.admitting, "failure": self.failure,
                "switches": self.switches, "training_linger_ms": self.linger_s * 1000,
                "max_phase_ms": self.max_phase_s * 1000,
                "waiting": {side: len(w) for side, w in self._waiters.items()},
                "active": dict(self._active), "barriers": list(self.barriers)[-last:] if last else []}
