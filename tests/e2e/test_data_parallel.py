"""Two data-parallel trainer ranks (torchrun, gloo) train exactly like one."""

from __future__ import annotations

import pytest

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
    """The pid of trainer rank `rank` of the cluster in `state_dir` (torchrun sets RANK; a lone rank, started
    without torchrun, has none and is rank 0)."""
    from tests.e2e.conftest import _processes_mentioning

    for pid in _processes_mentioning(str(state_dir / "run" / "cluster.json")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        ranks = [int(var[len(b"RANK="):]) for var in environ if var.startswith(b"RANK=")] or [0]
        if b"actors.trainer.main" in cmdline and b"torch.distributed.run" not in cmdline and ranks == [rank]:
            return pid
    raise LookupError(f"no trainer rank {rank} under {state_dir}")
