"""Clock cycles: which ready requests of which runs the trainer runs next, and together.

Every run keeps the requests its SeqLedger released (strict seq_id order) in a queue of
its own, and one executor runs one cycle at a time. A cycle is formed from the heads of
those queues, so a run's requests never overtake each other and its optim_step, save and
load stay barriers for that run alone:

- The **leader** is the head of the first run in round-robin order. Users take turns, and
  within a user's turn the user's runs take turns: a user with many runs, or many
  requests queued, leads once per round like everyone else.
- **Pass cycle** (the leader's head is a forward_backward or forward): every run whose
  head is one too joins, users interleaved in turn order, while the pass stays within
  `max_tokens_per_pass` padded tokens per trainer rank (rows x longest row). A run's
  consecutive forward_backwards join together: until its optim_step they only add
  gradients. The leader's first request always runs, even alone past the budget (the
  trainer then cuts it into microbatches).
- **Optim cycle**: every run whose head is an optim_step joins; their gradients are
  all-reduced in one collective.
- Anything else (create, load, save, sampler export, a run's removal) runs alone.

The order is by who was served longest ago (a newcomer counts as never served): the
users a cycle served go behind the users it left waiting, and within a user its served
runs behind the others, so whoever the budget kept out leads next, and a user with huge
batches delays another user by at most one cycle.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cluster.messages import ForwardBackwardReq, OptimStepReq

PASS, OPTIM, ALONE = "pass", "optim", "alone"


def kind_of(req: Any) -> str:
    if isinstance(req, ForwardBackwardReq):
        return PASS
    return OPTIM if isinstance(req, OptimStepReq) else ALONE


@dataclass
class Cycle:
    kind: str
    ops: list[Any]  # _Op (actors/controller/training.py): .run (.user, .model_id), .req


@dataclass
class CycleStats:
    """What the admin probe shows: how much sharing the cycles achieved."""

    cycles: int = 0
    passes: int = 0
    pass_requests: int = 0  # forward_backward requests over all passes
    shared_passes: int = 0  # passes holding more than one run's requests
    most_runs_in_a_pass: int = 0
    optim_cycles: int = 0
    optim_steps: int = 0

    def count(self, cycle: Cycle) -> None:
        self.cycles += 1
        runs = len({id(op.run) for op in cycle.ops})
        if cycle.kind == PASS:
            self.passes += 1
            self.pass_requests += len(cycle.ops)
            self.shared_passes += runs > 1
            self.most_runs_in_a_pass = max(self.most_runs_in_a_pass, runs)
        elif cycle.kind == OPTIM:
            self.optim_cycles += 1
            self.optim_steps += len(cycle.ops)


@dataclass
class _Budget:
    max_tokens: int
    dp: int
    rows: int = 0
    width: int = 0

    def admits(self, req: ForwardBackwardReq) -> bool:
        """Take `req` if the pass still fits with it (on the busiest DP rank) and return whether it did."""
        lengths = req.batch.lengths
        rows = self.rows + -(-len(lengths) // self.dp)
        width = max(self.width, int(lengths.max()) if len(lengths) else 0)
        if self.rows and rows * width > self.max_tokens:
            return False
        self.rows, self.width = rows, width
        return True


@dataclass
class CycleScheduler:
    max_tokens_per_pass: int
    dp: int = 1
    stats: CycleStats = field(default_factory=CycleStats)
    _runs: dict = field(default_factory=dict)  # user -> their runs with queued requests, in arrival order
    _queues: dict = field(default_factory=dict)  # id(run) -> deque of its released ops
    _last_served: dict = field(default_factory=dict)  # user, or ("run", model_id) -> the cycle that last served it
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, op: Any) -> None:
        run = op.run
        queue = self._queues.setdefault(id(run), deque())
        if not queue:
            self._runs.setdefault(run.user, []).append(run)
        queue.append(op)
        self._arrived.set()

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def forget_run(self, model_id: str) -> None:
        """A run that is gone (dropped, or never created) leaves the order: a long-lived server sees many."""
        self._last_served.pop(("run", model_id), None)

    async def next_cycle(self) -> Cycle:
        while not self._runs:
            self._arrived.clear()
            await self._arrived.wait()
        order = self._rotation()
        kind = kind_of(self._queues[id(order[0])][0].req)
        if kind == PASS:
            ops = self._take_pass(order)
        elif kind == OPTIM:
            ops = [self._pop(run) for run in order if kind_of(self._queues[id(run)][0].req) == OPTIM]
        else:
            ops = [self._pop(order[0])]
        cycle = Cycle(kind, ops)
        self.stats.count(cycle)
        for op in ops:  # behind everyone this cycle left waiting (never served counts as longest ago)
            self._last_served[op.run.user] = self._last_served[("run", op.run.model_id)] = self.stats.cycles
        return cycle

    def _rotation(self) -> list[Any]:
        """Every run with queued requests: users by who was served longest ago, each user's runs likewise; the
        first run of each user in that order, then the second, ..."""
        def waited(key) -> int:
            return self._last_served.get(key, -1)
        users = sorted(self._runs, key=waited)
        per_user = [sorted(self._runs[user], key=lambda run: waited(("run", run.model_id))) for user in users]
        depth = max(len(runs) for runs in per_user)
        return [runs[i] for i in range(depth) for runs in per_user if i < len(runs)]

    def _take_pass(self, order: list[Any]) -> list[Any]:
        budget, ops = _Budget(self.max_tokens_per_pass, self.dp), []
        for run in order:
            queue = self._queues[id(run)]
            while queue and kind_of(queue[0].req) == PASS and budget.admits(queue[0].req):
                ops.append(queue.popleft())
            self._forget_if_idle(run)
        return ops

    def _pop(self, run: Any) -> Any:
        op = self._queues[id(run)].popleft()
        self._forget_if_idle(run)
        return op

    def _forget_if_idle(self, run: Any) -> None:
        if self._queues.get(id(run)):
            return
        self._queues.pop(id(run), None)
        runs = [r for r in self._runs.get(run.user, ()) if r is not run]  # by identity: runs are dataclasses
        if runs:
            self._runs[run.user] = runs
        else:
            self._runs.pop(run.user, None)
