"""What the controller keeps to rebuild a training run exactly after the trainer group died.

A torch.distributed group cannot be healed: when a rank dies the launcher restarts the
whole group, and every adapter it held is gone. So the controller keeps, per run, a
`RunJournal`: the latest **snapshot** of the run's adapter and optimizer state (a
training checkpoint the trainer wrote under STATE_DIR/snapshots, on the path every node
mounts) and the **replay log** of every state-changing request that ran since it
(creation or load, forward_backward with gradients, optim_step). Rebuilding loads the
snapshot and runs the log again in order; the request that was in flight then runs as
if nothing happened, with the result it would have had (CPU and CUDA kernels are
deterministic for a fixed batch and layout; tests/e2e/test_trainer_recovery.py checks
the losses bit for bit against a run that never crashed). A logged request that shared a
clock cycle's pass with other runs (cycles.py) is replayed alone: a different batch, so
the rebuilt state equals the lost one up to float32 summation noise, not bit for bit.

Snapshot policy: a snapshot is taken right after an optim_step (gradients are empty
then, so the snapshot is the whole state), when the trainer time the run spent since the
last snapshot is at least 1/budget times what that snapshot cost (budget = 5% by
default, `--snapshot-budget`), or when the log holds MAX_REPLAY_OPS requests. So the
cost stays under the budget whatever the model size, and the replay after a crash takes
at most about 1/budget snapshot costs of trainer time. Two directories per run take
turns, so a crash while writing one leaves the other whole. Sizing for large models is
in the README ("Surviving failures").
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.messages import CreateModelReq, ForwardBackwardReq, LoadWeightsReq, OptimStepReq

MAX_REPLAY_OPS = 256  # a snapshot is due at the next optim_step past this many logged requests
SNAPSHOT_SLOTS = ("a", "b")


def changes_state(req: Any) -> bool:
    """Whether running `req` changes the run's trainer state (so a rebuild must run it again)."""
    if isinstance(req, ForwardBackwardReq):
        return not req.forward_only
    return isinstance(req, (CreateModelReq, LoadWeightsReq, OptimStepReq))


@dataclass
class RunJournal:
    generation: int = 0  # the trainer group generation that holds the run's adapter (0: not created yet)
    snapshot: str = ""  # the latest snapshot's directory; "" = rebuild from the log's first request
    log: list[Any] = field(default_factory=list)  # state-changing requests since the snapshot, in order
    work_s: float = 0.0  # trainer time spent on the logged requests
    snapshot_cost_s: float | None = None  # what the latest snapshot took
    snapshots: int = 0
    deaths: int = 0  # trainer group deaths while this run's request ran, since its last success
    total_work_s: float = 0.0  # over the run's life: its logged requests' trainer time ...
    total_snapshot_s: float = 0.0  # ... and its snapshots' (the probe shows the ratio)

    def record(self, req: Any, elapsed_s: float, generation: int) -> None:
        self.generation, self.deaths = generation, 0
        if changes_state(req):
            self.log.append(req)
            self.work_s += elapsed_s
            self.total_work_s += elapsed_s

    def snapshot_due(self, budget: float) -> bool:
        if not self.log or not isinstance(self.log[-1], OptimStepReq):
            return False
        if self.snapshot_cost_s is None or len(self.log) >= MAX_REPLAY_OPS:
            return True
        return self.work_s * budget >= self.snapshot_cost_s

    def next_snapshot_dir(self, root: Path) -> str:
        slot = SNAPSHOT_SLOTS[self.snapshots % len(SNAPSHOT_SLOTS)]
        return str(root / slot)

    def snapshot_taken(self, directory: str, cost_s: float) -> None:
        self.snapshot, self.snapshot_cost_s = directory, cost_s
        self.snapshots += 1
        self.total_snapshot_s += cost_s
        self.log, self.work_s = [], 0.0

    def describe(self) -> dict[str, Any]:
        overhead = self.total_snapshot_s / self.total_work_s if self.total_work_s else None
        return {"generation": self.generation, "snapshots": self.snapshots, "replay_log": len(self.log),
                "snapshot_cost_ms": None if self.snapshot_cost_s is None else round(self.snapshot_cost_s * 1e3, 1),
                "snapshot_overhead": None if overhead is None else round(overhead, 4)}


def snapshot_root(state_dir: str, model_id: str) -> Path:
    return Path(state_dir) / "snapshots" / model_id


def forget_snapshots(state_dir: str, model_id: str) -> None:
    shutil.rmtree(snapshot_root(state_dir, model_id), ignore_errors=True)
