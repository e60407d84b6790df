"""The recovery journal's snapshot policy (actors/controller/recovery.py): cost-bounded, always after a step."""

from __future__ import annotations

from pathlib import Path

from actors.controller.recovery import MAX_REPLAY_OPS, RunJournal, changes_state
from cluster.messages import (
    AdamParams, CreateModelReq, ForwardBackwardReq, LoraSpec, OptimStepReq, SaveWeightsForSamplerReq, SaveWeightsReq,
)


def _fb(forward_only: bool = False) -> ForwardBackwardReq:
    return ForwardBackwardReq(model_id="m", seq_id=1, loss_fn="cross_entropy", forward_only=forward_only,
                              batch=None)


def _step() -> OptimStepReq:
    return OptimStepReq(model_id="m", seq_id=2, adam=AdamParams())


def test_only_requests_that_change_trainer_state_are_logged():
    assert changes_state(_fb()) and changes_state(_step())
    assert changes_state(CreateModelReq(session_id="s", model_seq_id=0, base_model="b", lora=LoraSpec(rank=8)))
    assert not changes_state(_fb(forward_only=True))
    assert not changes_state(SaveWeightsReq(model_id="m", seq_id=3, name="x"))
    assert not changes_state(SaveWeightsForSamplerReq(model_id="m", seq_id=3, name="x"))
    journal = RunJournal()
    journal.record(_fb(forward_only=True), 1.0, generation=1)
    journal.record(SaveWeightsReq(model_id="m", seq_id=3, name="x"), 1.0, generation=1)
    assert journal.log == [] and journal.work_s == 0 and journal.generation == 1


def test_the_first_snapshot_comes_after_the_first_step_and_then_within_the_budget():
    journal = RunJournal(deaths=2)
    journal.record(_fb(), 0.1, generation=1)
    assert journal.deaths == 0  # a success ends a run of deaths
    assert not journal.snapshot_due(0.05)  # gradients pending: a snapshot would not be the whole state
    journal.record(_step(), 0.01, generation=1)
    assert journal.snapshot_due(0.05)  # its cost is unknown: measure it now
    journal.snapshot_taken("/snap/a", cost_s=0.02)
    assert journal.log == [] and journal.snapshot == "/snap/a"
    # 0.11 s of work per step; a 0.02 s snapshot fits a 5% budget after 0.4 s of work: the 4th step
    due = []
    for _ in range(4):
        journal.record(_fb(), 0.1, generation=1)
        journal.record(_step(), 0.01, generation=1)
        due.append(journal.snapshot_due(0.05))
    assert due == [False, False, False, True]
    assert len(journal.log) == 8
    journal.snapshot_taken("/snap/b", cost_s=0.02)
    # one 0.02 s snapshot per 0.44 s of steps from then on: within the 5% budget
    assert journal.describe()["snapshot_overhead"] == round(0.04 / (0.11 * 5), 4)
    for _ in range(40):
        journal.record(_fb(), 0.1, generation=1)
        journal.record(_step(), 0.01, generation=1)
        if journal.snapshot_due(0.05):
            journal.snapshot_taken("/snap/a", cost_s=0.02)
    assert journal.describe()["snapshot_overhead"] <= 0.05 + 0.02 / (0.11 * 45)  # the first, unbudgeted one


def test_a_long_replay_log_forces_a_snapshot_and_the_directories_take_turns(tmp_path: Path):
    journal = RunJournal(snapshot_cost_s=1e9)  # a snapshot that never fits the budget
    while len(journal.log) < MAX_REPLAY_OPS:
        journal.record(_fb(), 0.001, generation=1)
        journal.record(_step(), 0.001, generation=1)
    assert journal.snapshot_due(0.05)
    first = journal.next_snapshot_dir(tmp_path)
    journal.snapshot_taken(first, 1.0)
    second = journal.next_snapshot_dir(tmp_path)
    journal.snapshot_taken(second, 1.0)
    assert first != second and journal.next_snapshot_dir(tmp_path) == first
