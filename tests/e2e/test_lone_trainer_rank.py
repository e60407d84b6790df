"""One trainer rank (the default) runs without torchrun: the launcher starts the rank itself, so the process it
watches and kills is the rank. SIGKILLed from outside mid-training, it is noticed, the group is started again,
and the run goes on with the losses of a run that never crashed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from tinker import types

from cluster.messages import AdminStatusReq
from launch.probe import ask
from tests.e2e.conftest import BUILTIN_MODEL, _processes_mentioning, launch_cluster, wait_until
from tests.e2e.pig_latin import WORDS, sft_batch
from tests.e2e.test_data_parallel import _trainer_rank_pid

pytestmark = pytest.mark.e2e

ADAM = types.AdamParams(learning_rate=5e-3)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _group(state_dir: Path) -> dict:
    token = (state_dir / "run" / "admin.token").read_text().strip()
    return ask(state_dir, AdminStatusReq(token=token)).info["trainer_group"]


def _train(tc, data, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    return losses


def test_a_lone_rank_is_the_launchers_child_and_is_restarted_when_killed(tmp_path, models_dir):
    with launch_cluster(tmp_path / "state", models_dir, "--heartbeat-timeout", "3") as running:
        marker = str(running.state_dir / "run" / "cluster.json")
        assert not [pid for pid in _processes_mentioning(marker)
                    if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        rank = _trainer_rank_pid(running.state_dir, 0)
        assert _parent(rank) == running.proc.pid

        service = running.service_client()
        reference = service.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result()
        data = sft_batch(reference.get_tokenizer(), WORDS[:8])
        expected = _train(reference, data, 3)
        tc = service.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result()
        losses = _train(tc, data, 1)

        before = _group(running.state_dir)
        os.kill(rank, signal.SIGKILL)
        wait_until(lambda: _group(running.state_dir)["deaths"] > before["deaths"], 30, "the death noticed")
        wait_until(lambda: _group(running.state_dir)["generation"] > before["generation"], 120, "the restart")
        again = _trainer_rank_pid(running.state_dir, 0)
        assert again != rank and _parent(again) == running.proc.pid
        losses += _train(tc, data, 2)  # the run is rebuilt before its next step
        assert losses == expected
        service.close("success").result()
