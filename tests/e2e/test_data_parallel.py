"""Two data-parallel trainer ranks (torchrun, gloo) train exactly like one."""

from __future__ import annotations

import pytest

from tinker import types

from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster
from tests.e2e.pig_latin import WORDS, sft_batch, train_steps

pytestmark = pytest.mark.e2e


def _losses(service_client) -> list[float]:
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=42).result()
    data = sft_batch(tc.get_tokenizer(), WORDS[:7])  # odd count: the shards differ in size
    return train_steps(tc, data, steps=4)


def test_two_ranks_give_the_same_losses_as_one(service_client, tmp_path, models_dir):
    one_rank = _losses(service_client)
    with launch_cluster(tmp_path / "dp2", models_dir, "--trainer-ranks", "2") as dp_cluster:
        client = dp_cluster.service_client()
        two_ranks = _losses(client)
        client.close("success").result()
    assert two_ranks == pytest.approx(one_rank, abs=1e-4)
    assert two_ranks[-1] < two_ranks[0]


def _trainer_rank_pid(state_dir, rank: int) -> int:
    """The pid of trainer rank `rank` of the cluster in `state_dir` (torchrun sets RANK)."""
    from tests.e2e.conftest import _processes_mentioning

    for pid in _processes_mentioning(str(state_dir / "run" / "cluster.json")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"actors.trainer.main" in cmdline and b"torch.distributed.run" not in cmdline \
                and f"RANK={rank}".encode() in environ:
            return pid
    raise LookupError(f"no trainer rank {rank} under {state_dir}")


def test_a_rank_stuck_in_a_collective_fails_the_step_instead_of_hanging(tmp_path, models_dir):
    """A frozen rank (SIGSTOP: alive, silent) leaves the other waiting in the all-reduce;
    the controller's deadline fails the step with the cause, and every later one."""
    import os
    import signal
    import time

    with launch_cluster(tmp_path / "stuck", models_dir, "--trainer-ranks", "2", "--trainer-timeout", "4") as running:
        client = running.service_client()
        tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=1).result()
        data = sft_batch(tc.get_tokenizer(), WORDS[:4])
        tc.forward_backward(data, "cross_entropy").result()
        frozen = _trainer_rank_pid(running.state_dir, 1)
        os.kill(frozen, signal.SIGSTOP)
        try:
            started = time.monotonic()
            # rank 0 answers nothing either: it waits for rank 1 in the step's first all-reduce
            with pytest.raises(Exception, match=r"trainer rank\(s\) \[0, 1\] did not answer "
                                                r"TrainerForwardBackwardReq within 4 s"):
                tc.forward_backward(data, "cross_entropy").result()
            assert time.monotonic() - started < 30
            with pytest.raises(Exception, match="did not answer"):  # the ranks are out of step: fail fast
                tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        finally:
            os.kill(frozen, signal.SIGCONT)
