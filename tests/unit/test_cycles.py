"""The clock-cycle scheduler (actors/controller/cycles.py): what runs together, and who goes first."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from actors.controller.cycles import ALONE, OPTIM, PASS, CycleScheduler
from cluster.messages import AdamParams, DatumBatch, ForwardBackwardReq, OptimStepReq, SaveWeightsReq


@dataclass(eq=True)  # like TrainingRun: equal fields must not make two runs one
class Run:
    user: str
    model_id: str = ""
    slot: int = field(default=0)


@dataclass
class Op:
    run: Run
    req: object
    name: str


def _fb(rows: int, width: int) -> ForwardBackwardReq:
    lengths = np.full(rows, width, dtype=np.int64)
    batch = DatumBatch(tokens=np.zeros(rows * width, dtype=np.int64), lengths=lengths)
    return ForwardBackwardReq(model_id="", seq_id=0, loss_fn="cross_entropy", batch=batch)


def _optim() -> OptimStepReq:
    return OptimStepReq(model_id="", seq_id=0, adam=AdamParams())


def _save() -> SaveWeightsReq:
    return SaveWeightsReq(model_id="", seq_id=0, name="x")


def _cycles(scheduler: CycleScheduler, count: int) -> list[tuple[str, list[str]]]:
    async def take():
        return [await scheduler.next_cycle() for _ in range(count)]
    return [(c.kind, [op.name for op in c.ops]) for c in asyncio.run(take())]


def test_the_ready_heads_of_every_run_share_a_pass_then_an_optim_step():
    scheduler = CycleScheduler(max_tokens_per_pass=1000)
    runs = [Run("alice", "a"), Run("bob", "b"), Run("carol", "c")]
    for run in runs:
        scheduler.put(Op(run, _fb(2, 8), f"{run.model_id}.fb1"))
        scheduler.put(Op(run, _fb(2, 8), f"{run.model_id}.fb2"))
        scheduler.put(Op(run, _optim(), f"{run.model_id}.optim"))
    assert _cycles(scheduler, 2) == [
        (PASS, ["a.fb1", "a.fb2", "b.fb1", "b.fb2", "c.fb1", "c.fb2"]),  # a run's forward_backwards go together
        (OPTIM, ["a.optim", "b.optim", "c.optim"]),
    ]
    assert scheduler.queued() == 0 and scheduler.stats.most_runs_in_a_pass == 3


def test_a_barrier_runs_alone_and_holds_back_only_its_own_run():
    scheduler = CycleScheduler(max_tokens_per_pass=1000)
    a, b = Run("alice", "a"), Run("bob", "b")
    scheduler.put(Op(a, _save(), "a.save"))
    scheduler.put(Op(a, _fb(1, 4), "a.fb"))
    scheduler.put(Op(b, _fb(1, 4), "b.fb"))
    assert _cycles(scheduler, 2) == [(ALONE, ["a.save"]), (PASS, ["b.fb", "a.fb"])]


def test_a_heavy_user_delays_a_light_one_by_at_most_one_cycle():
    scheduler = CycleScheduler(max_tokens_per_pass=64 * 32)
    heavy, light = Run("heavy", "h"), Run("light", "l")
    for i in range(4):
        scheduler.put(Op(heavy, _fb(64, 32), f"h.fb{i}"))  # each fills a whole pass
    assert _cycles(scheduler, 1) == [(PASS, ["h.fb0"])]
    scheduler.put(Op(light, _fb(1, 8), "l.fb"))  # arrives while the heavy user's first pass runs
    assert _cycles(scheduler, 3) == [(PASS, ["l.fb"]), (PASS, ["h.fb1"]), (PASS, ["h.fb2"])]


def test_users_take_turns_and_a_users_runs_take_turns_within_them():
    scheduler = CycleScheduler(max_tokens_per_pass=1000)
    a1, a2, b = Run("alice", "a1"), Run("alice", "a2"), Run("bob", "b")
    assert a1 != a2
    for i in range(2):
        for run in (a1, a2, b):
            scheduler.put(Op(run, _save(), f"{run.model_id}.{i}"))
    order = [ops[0] for _, ops in _cycles(scheduler, 6)]
    assert order == ["a1.0", "b.0", "a2.0", "b.1", "a1.1", "a2.1"]  # bob gets every other cycle while he waits


def test_the_budget_counts_rows_per_data_parallel_rank():
    scheduler = CycleScheduler(max_tokens_per_pass=4 * 16, dp=2)
    a, b = Run("alice", "a"), Run("bob", "b")
    scheduler.put(Op(a, _fb(4, 16), "a.fb"))  # 2 rows per rank
    scheduler.put(Op(b, _fb(4, 16), "b.fb"))  # 2 more: 4 x 16 per rank fits
    scheduler.put(Op(b, _fb(2, 16), "b.fb2"))  # 1 more does not
    assert _cycles(scheduler, 2) == [(PASS, ["a.fb", "b.fb"]), (PASS, ["b.fb2"])]


def test_a_forgotten_run_leaves_the_order():
    scheduler = CycleScheduler(max_tokens_per_pass=1000)
    runs = [Run("alice", "a1"), Run("alice", "a2")]
    for run in runs:
        scheduler.put(Op(run, _fb(1, 4), f"{run.model_id}.fb"))
    assert _cycles(scheduler, 1) == [(PASS, ["a1.fb", "a2.fb"])]
    assert set(scheduler._last_served) == {"alice", ("run", "a1"), ("run", "a2")}
    scheduler.forget_run("a1")
    scheduler.forget_run("never-seen")  # a create that failed before it was served
    assert set(scheduler._last_served) == {"alice", ("run", "a2")}
