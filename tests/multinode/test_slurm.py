"""launch/slurm/tinkerd.sbatch on a real 2-node SLURM cluster (tests/multinode/slurm.py): the job starts tinkerd
with the controller and API on its first node and a trainer rank and an engine on each node (srun steps), prints
the base_url in its output file, serves the SDK, and scancel leaves no process on either node."""

from __future__ import annotations

import re
import sys
import time

import pytest
from tinker import types

from tests.e2e.conftest import API_KEY, BUILTIN_MODEL, REPO_ROOT, _processes_mentioning, models_dir  # noqa: F401
from tests.e2e.pig_latin import WORDS, chat_prompt, sft_batch
from tests.multinode.slurm import SlurmCluster

pytestmark = pytest.mark.multinode
SBATCH = REPO_ROOT / "launch" / "slurm" / "tinkerd.sbatch"
READY = re.compile(r"tinkerd ready: base_url=(\S+)")


def wait_for_base_url(slurm: SlurmCluster, job_id: int, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    output = slurm.output_path(job_id)
    while time.monotonic() < deadline:
        text = output.read_text() if output.exists() else ""
        if match := READY.search(text):
            return match.group(1)
        state = slurm.job_info(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state}:\n{text[-4000:]}"
        time.sleep(0.5)
    raise TimeoutError(f"no base_url in {output} after {timeout_s} s:\n{output.read_text()[-4000:]}")


def test_sbatch_starts_tinkerd_across_the_allocation_and_scancel_ends_it(slurm_cluster, tmp_path, models_dir):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "models").symlink_to(models_dir, target_is_directory=True)
    env = {"TINKERD_STATE_DIR": str(state_dir), "TINKERD_WORKDIR": str(REPO_ROOT), "TINKERD_PYTHON": sys.executable,
           "TINKERD_IFNAME": "eth0", "TINKERD_ARGS": "--heartbeat-timeout 20"}
    job_id = slurm_cluster.sbatch(SBATCH.read_text(), env=env)
    try:
        base_url = wait_for_base_url(slurm_cluster, job_id)
        first = slurm_cluster.job_info(job_id)["BatchHost"]
        assert base_url.startswith(f"http://{slurm_cluster.hosts.address(first)}:")  # reachable from here
        import tinker

        client = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
        tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=1).result()
        tokenizer = tc.get_tokenizer()
        loss = tc.forward_backward(sft_batch(tokenizer, WORDS[:4]), "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("hello"), add_special_tokens=False))
        result = sampler.sample(prompt=prompt, num_samples=2, sampling_params=types.SamplingParams(max_tokens=6))
        assert loss > 0 and all(len(s.tokens) > 0 for s in result.result().sequences)
        logs = state_dir / "logs"
        assert "ready" in (logs / "engine1.log").read_text() and (logs / f"trainer@{first}.log").exists()
    finally:
        slurm_cluster.scancel(job_id)
    slurm_cluster.wait_state(job_id, ("CANCELLED", "COMPLETED"), timeout=30)
    deadline = time.monotonic() + 15
    while (left := {n: slurm_cluster.job_processes(n) for n in slurm_cluster.nodes}) and any(left.values()):
        assert time.monotonic() < deadline, f"processes left on the nodes after scancel: {left}"
        time.sleep(0.2)
    assert not _processes_mentioning(str(state_dir / "run" / "cluster.json"))
