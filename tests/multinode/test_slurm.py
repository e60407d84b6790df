"""launch/slurm/*.sbatch on a real 2-node SLURM cluster (tests/multinode/slurm.py).

tinkerd.sbatch: the job starts tinkerd with the controller and API on its first node and a trainer rank and an
engine on each node (srun steps). tinkerd-hetjob.sbatch: a heterogeneous job, the controller and API on component
0's node, a trainer rank and an engine on component 1's node. Each prints the base_url in its output file, serves
the SDK, and scancel leaves no process on either node."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
from tinker import types

from tests.e2e.conftest import API_KEY, BUILTIN_MODEL, REPO_ROOT, _processes_mentioning, models_dir  # noqa: F401
from tests.e2e.pig_latin import WORDS, chat_prompt, sft_batch
from tests.multinode.slurm import SlurmCluster

pytestmark = pytest.mark.multinode
SBATCH = REPO_ROOT / "launch" / "slurm" / "tinkerd.sbatch"
HETJOB_SBATCH = REPO_ROOT / "launch" / "slurm" / "tinkerd-hetjob.sbatch"
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


def job_env(state_dir: Path, models_dir: Path) -> dict[str, str]:
    """The TINKERD_* parameters of a job that runs this checkout's tinkerd on the built-in model."""
    state_dir.mkdir()
    (state_dir / "models").symlink_to(models_dir, target_is_directory=True)
    return {"TINKERD_STATE_DIR": str(state_dir), "TINKERD_WORKDIR": str(REPO_ROOT), "TINKERD_PYTHON": sys.executable,
            "TINKERD_IFNAME": "eth0", "TINKERD_ARGS": "--heartbeat-timeout 20"}


def train_and_sample(base_url: str) -> None:
    """One forward_backward, optim_step and sample through the tinker SDK."""
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
    client.close("success").result()  # ends the SDK's session and telemetry before the job goes away


def job_modules(slurm: SlurmCluster, node: str) -> set[str]:
    """The `python -m` modules the job's processes on the node run (not the srun clients that start them there)."""
    modules = set()
    for pid in slurm.job_processes(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if Path(argv[0]).name == "srun":
            continue
        modules.update(argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "-m")
    return modules


def scancel_leaves_nothing(slurm: SlurmCluster, job_id: int, state_dir: Path) -> None:
    slurm.wait_state(job_id, ("CANCELLED", "COMPLETED"), timeout=30)
    deadline = time.monotonic() + 15
    while (left := {n: slurm.job_processes(n) for n in slurm.nodes}) and any(left.values()):
        assert time.monotonic() < deadline, f"processes left on the nodes after scancel: {left}"
        time.sleep(0.2)
    assert not _processes_mentioning(str(state_dir / "run" / "cluster.json"))


def test_sbatch_starts_tinkerd_across_the_allocation_and_scancel_ends_it(slurm_cluster, tmp_path, models_dir):
    state_dir = tmp_path / "state"
    job_id = slurm_cluster.sbatch(SBATCH.read_text(), env=job_env(state_dir, models_dir))
    try:
        base_url = wait_for_base_url(slurm_cluster, job_id)
        first = slurm_cluster.job_info(job_id)["BatchHost"]
        assert base_url.startswith(f"http://{slurm_cluster.hosts.address(first)}:")  # reachable from here
        train_and_sample(base_url)
        logs = state_dir / "logs"
        assert "ready" in (logs / "engine1.log").read_text() and (logs / f"trainer@{first}.log").exists()
    finally:
        slurm_cluster.scancel(job_id)
    scancel_leaves_nothing(slurm_cluster, job_id, state_dir)


def test_hetjob_runs_the_controller_on_component_0_and_the_workers_on_component_1(slurm_cluster, tmp_path,
                                                                                     models_dir):
    state_dir = tmp_path / "state"
    # one node per component (sbatch's flags before `:` are component 0's, after it component 1's)
    job_id = slurm_cluster.sbatch(HETJOB_SBATCH.read_text(), "--nodes=1", ":", "--nodes=1",
                                  env=job_env(state_dir, models_dir))
    try:
        base_url = wait_for_base_url(slurm_cluster, job_id)
        # `scontrol show job JOBID` shows every component; JOBID+OFFSET shows one
        controller_node = slurm_cluster.job_info(f"{job_id}+0")["BatchHost"]
        worker_nodes = {slurm_cluster.job_info(f"{job_id}+1")[key] for key in ("NodeList", "BatchHost")}
        assert len(worker_nodes) == 1 and controller_node not in worker_nodes
        (worker_node,) = worker_nodes
        assert base_url.startswith(f"http://{slurm_cluster.hosts.address(controller_node)}:")
        train_and_sample(base_url)
        # the probe talks to the controller on its loopback, so it runs on component 0's node
        probe = [sys.executable, "-m", "launch.probe", "--state-dir", str(state_dir), "--json", "status"]
        out = slurm_cluster.hosts.run_on(controller_node, f"cd {shlex.quote(str(REPO_ROOT))} && "
                                                          f"{shlex.join(probe)}", timeout=60)
        rows = {row["name"]: row for row in json.loads(out.stdout)["rows"]}
        assert {rows[name]["host"] for name in ("trainer0", "engine0")} == {worker_node}, rows
        assert all(rows[name]["state"] in ("ready", "up") for name in ("trainer0", "engine0")), rows
        assert "trainer1" not in rows and "engine1" not in rows
        logs = state_dir / "logs"  # streamed here from the steps on the worker node; one trainer host: `trainer`
        assert "ready" in (logs / "engine0.log").read_text() and (logs / "trainer.log").exists()
        modules = {node: job_modules(slurm_cluster, node) for node in (controller_node, worker_node)}
        assert {"actors.controller.controller", "api.server"} <= modules[controller_node], modules
        assert not {"actors.trainer.main", "actors.engine.main"} & modules[controller_node], modules
        assert {"actors.trainer.main", "actors.engine.main"} <= modules[worker_node], modules
    finally:
        slurm_cluster.scancel(job_id)
    scancel_leaves_nothing(slurm_cluster, job_id, state_dir)
