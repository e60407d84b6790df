"""A hostfile cluster across two virtual hosts: the controller and API here (the root namespace), one trainer rank
and one engine on each of node1 and node2, started over ssh. It trains through the real tinker SDK exactly like
the same layout on one node, the admin probe sees every worker on its own host, and stopping the launcher (Ctrl-C,
or SIGKILL) leaves no process behind on any host."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinker import types

from tests.e2e.conftest import (  # noqa: F401  (models_dir: the fixture)
    BUILTIN_MODEL, REPO_ROOT, _processes_mentioning, launch_cluster, models_dir, probe_json,
)
from tests.e2e.pig_latin import WORDS, chat_prompt, sft_batch, train_steps
from tests.multinode.hosts import NODE_GLOO_ENV, VirtualHosts

pytestmark = pytest.mark.multinode
HOSTFILE = "node1 slots=1 engines=1\nnode2 slots=1 engines=1\n"


def hostfile_flags(hosts: VirtualHosts, directory: Path) -> list[str]:
    hostfile = directory / "hosts"
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text(HOSTFILE)
    return ["--hostfile", str(hostfile), "--ssh-config", str(hosts.ssh_config),
            "--advertise-addr", hosts.head_address, "--gloo-ifname", NODE_GLOO_ENV["GLOO_SOCKET_IFNAME"]]


def train_and_sample(client) -> tuple[list[float], list[list[int]]]:
    """A few steps, then sampling twice: an adapter pushed over zmq to the engines, and one loaded from its
    checkpoint directory in the shared state dir."""
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=42).result()
    tokenizer = tc.get_tokenizer()
    losses = train_steps(tc, sft_batch(tokenizer, WORDS[:5]), steps=3)
    prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("hello"), add_special_tokens=False))
    params = types.SamplingParams(max_tokens=8, temperature=0.0, seed=3)
    pushed = tc.save_weights_and_get_sampling_client().result()
    from_disk = client.create_sampling_client(model_path=tc.save_weights_for_sampler(name="mn").result().path).result()
    samples = []
    for sampler in (pushed, from_disk):
        result = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
        samples.append(list(result.sequences[0].tokens))
    return losses, samples


def processes_on_nodes(hosts: VirtualHosts) -> dict[str, list[str]]:
    """Every process on each node but its sshd daemon (sessions still open would count)."""
    left = {}
    for node in hosts.nodes:
        rows = []
        for pid in hosts.pids_on(node):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if not (cmdline.startswith("sshd: ") and cmdline.endswith("startups")):  # the daemon's own title
                rows.append(f"{pid} {cmdline}")
        left[node] = rows
    return left


def wait_until_nodes_are_empty(hosts: VirtualHosts, timeout_s: float = 20) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    while any((left := processes_on_nodes(hosts)).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left



def test_a_two_host_cluster_trains_like_one_node_and_leaves_nothing_behind(virtual_hosts, tmp_path, models_dir):
    with launch_cluster(tmp_path / "one-node", models_dir, "--trainer-ranks", "2", "--engines", "2") as local:
        client = local.service_client()
        expected_losses, expected_samples = train_and_sample(client)
        client.close("success").result()

    state_dir = tmp_path / "two-hosts"
    with launch_cluster(state_dir, models_dir, *hostfile_flags(virtual_hosts, tmp_path)) as running:
        client = running.service_client()
        losses, samples = train_and_sample(client)
        status = probe_json(running, "status")
        hosts = {row["name"]: row["host"] for row in status["rows"]}
        assert {k: hosts[k] for k in ("trainer0", "trainer1", "engine0", "engine1")} == {
            "trainer0": "node1", "trainer1": "node2", "engine0": "node1", "engine1": "node2"}
        assert all(row["state"] in ("ready", "up") for row in status["rows"]), status["rows"]
        assert status["info"]["layout"] == "dp=2 tp=1 pp=1"
        assert probe_json(running, "runs")["rows"] and probe_json(running, "sessions")["rows"]
        assert probe_json(running, "futures", "--recent", "5")["rows"]
        on_nodes = processes_on_nodes(virtual_hosts)
        assert all(any("actors.engine.main" in p for p in on_nodes[n]) for n in virtual_hosts.nodes), on_nodes
        client.close("success").result()
    # launch_cluster sent SIGINT and found no process of this cluster here; the nodes must be empty too
    assert wait_until_nodes_are_empty(virtual_hosts) == {node: [] for node in virtual_hosts.nodes}
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert samples == expected_samples and samples[0] == samples[1]
    for name in ("trainer@node1", "trainer@node2", "engine0", "engine1"):  # remote logs come back here
        assert "ready" in (state_dir / "logs" / f"{name}.log").read_text()


def test_a_killed_launcher_takes_every_remote_process_with_it(virtual_hosts, tmp_path, models_dir):
    state_dir = tmp_path / "state"
    with launch_cluster(state_dir, models_dir, *hostfile_flags(virtual_hosts, tmp_path)) as running:
        assert all(processes_on_nodes(virtual_hosts).values())
        running.proc.send_signal(signal.SIGKILL)  # no chance to stop anything itself
        running.proc.wait(timeout=10)
        left = wait_until_nodes_are_empty(virtual_hosts)
    assert left == {node: [] for node in virtual_hosts.nodes}
    assert not _processes_mentioning(str(state_dir / "run" / "cluster.json"))


def test_a_host_without_the_state_dir_is_refused_before_anything_starts(virtual_hosts, tmp_path, models_dir):
    """node2 does not see the state dir (as if it were not shared): the launcher names the host and the path."""
    state_dir = tmp_path / "private"
    state_dir.mkdir()
    (state_dir / "models").symlink_to(models_dir, target_is_directory=True)
    # the nodes share this machine's /tmp; an empty directory mounted over it in node2's sshd (a mount namespace
    # of its own) hides it from every ssh session there, and from nothing else
    virtual_hosts.run_on("node2", f"mount --bind \"$(mktemp -d)\" {tmp_path}")
    try:
        out = subprocess.run([sys.executable, "-m", "launch.cluster", "--state-dir", str(state_dir), "--port", "0",
                              *hostfile_flags(virtual_hosts, tmp_path / "c")],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    finally:
        virtual_hosts.run_on("node2", f"umount {tmp_path}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "host node2" in out.stderr and "same path on every host" in out.stderr, out.stderr
    assert not (state_dir / "logs" / "controller.log").exists()
