"""Sanity tests of the multi-node harness itself: each would fail if the virtual hosts or the SLURM cluster did not
behave like separate machines the way the launcher tests rely on (names, addresses, ssh, gloo, losing a node,
clean teardown, sbatch/srun/scancel)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.multinode.hosts import NODE_GLOO_ENV, HarnessError, VirtualHosts
from tests.multinode.slurm import SlurmCluster

pytestmark = pytest.mark.multinode
GLOO_SCRIPT = Path(__file__).resolve().parent / "gloo_allreduce.py"


def test_ssh_reaches_each_node_with_its_own_name_and_address(virtual_hosts: VirtualHosts) -> None:
    for node in virtual_hosts.nodes:
        out = virtual_hosts.run_on(node, "hostname; ip -4 -o addr show dev eth0").stdout.split("\n", 1)
        assert out[0] == node
        assert f"inet {virtual_hosts.address(node)}/24" in out[1]


def test_root_side_routes_the_subnet_only_to_the_harness_veth(virtual_hosts: VirtualHosts) -> None:
    route = subprocess.run(["ip", "-4", "route", "get", virtual_hosts.address("node2")], capture_output=True,
                           text=True, check=True).stdout
    assert f"dev {virtual_hosts.head_interface} " in route and f"src {virtual_hosts.head_address}" in route
    assert "via" not in route


def test_node1_reaches_node2_and_the_root_side_by_name(virtual_hosts: VirtualHosts) -> None:
    with socket.create_server((virtual_hosts.head_address, 0)) as server:
        port = server.getsockname()[1]
        greeting = threading.Thread(target=lambda: server.accept()[0].sendall(b"from-head\n"), daemon=True)
        greeting.start()
        script = (f"getent hosts node2 {virtual_hosts.head_name}; "
                  "exec 3<>/dev/tcp/node2/22; head -c 7 <&3; echo; "
                  f"exec 4<>/dev/tcp/{virtual_hosts.head_name}/{port}; head -n1 <&4")
        out = virtual_hosts.run_on("node1", ["timeout", "5", "bash", "-c", script]).stdout.splitlines()
        greeting.join(timeout=5)
    assert out[0].split() == [virtual_hosts.address("node2"), "node2"]
    assert out[1].split() == [virtual_hosts.head_address, virtual_hosts.head_name]
    assert out[2:] == ["SSH-2.0", "from-head"]


def run_gloo_ranks(hosts: VirtualHosts, ranks: list[tuple[str | None, dict[str, str]]]) -> list[str]:
    """Start one gloo rank per (node, env) - node None means the root namespace - and return each rank's output.
    Rank 0 is on node1, whose address is the tcp:// rendezvous, as the launcher will do it."""
    master = hosts.address("node1")
    port = 29500 + os.getpid() % 1000
    procs = []
    for rank, (node, env) in enumerate(ranks):
        argv = [sys.executable, str(GLOO_SCRIPT), str(rank), str(len(ranks)), master, str(port)]
        if node is None:
            procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        else:
            command = ["env", *(f"{key}={value}" for key, value in env.items()), *argv]
            procs.append(hosts.popen_on(node, command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n---\n".join(outputs)
    return outputs


def test_gloo_all_reduce_across_the_two_nodes(virtual_hosts: VirtualHosts) -> None:
    outputs = run_gloo_ranks(virtual_hosts, [("node1", NODE_GLOO_ENV), ("node2", NODE_GLOO_ENV)])
    assert "rank 0 host node1 sum 3" in outputs[0] and "rank 1 host node2 sum 3" in outputs[1]


def test_gloo_with_name_resolution_alone_and_a_rank_in_the_root_namespace(virtual_hosts: VirtualHosts) -> None:
    # Nodes need no GLOO_SOCKET_IFNAME (their hostnames resolve to eth0); the root side does: its hostname
    # resolves to loopback in the machine's own /etc/hosts, which gloo would advertise to the nodes.
    root_env = {"GLOO_SOCKET_IFNAME": virtual_hosts.head_interface}
    outputs = run_gloo_ranks(virtual_hosts, [("node1", {}), ("node2", {}), (None, root_env)])
    assert [line for out in outputs for line in out.splitlines() if line.startswith("rank")] == [
        "rank 0 host node1 sum 6", "rank 1 host node2 sum 6", f"rank 2 host {socket.gethostname()} sum 6"]


def wait_for_command_on(hosts: VirtualHosts, node: str, word: bytes, timeout: float = 5) -> set[int]:
    """Pids on the node whose command line contains word, once there is at least one."""
    deadline = time.monotonic() + timeout
    while True:
        found = set()
        for pid in hosts.pids_on(node):
            try:
                if word in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.add(pid)
            except OSError:
                continue
        if found:
            return found
        assert time.monotonic() < deadline, f"no {word!r} process showed up on {node} in {timeout} s"
        time.sleep(0.05)


def test_kill_node_kills_what_runs_there_and_nothing_outside() -> None:
    outside = subprocess.Popen(["sleep", "60"])
    try:
        with VirtualHosts(nodes=("node1", "node2")) as hosts:
            hosts.run_on("node1", "nohup sleep 61 >/dev/null 2>&1 & echo started")
            on_node2 = hosts.popen_on("node2", "sleep 62")
            sleep_on_node1 = wait_for_command_on(hosts, "node1", b"sleep\x0061")
            wait_for_command_on(hosts, "node2", b"sleep\x0062")
            node2_before = set(hosts.pids_on("node2"))
            killed = hosts.kill_node("node1")
            assert sleep_on_node1 <= set(killed) and hosts.pids_on("node1") == []
            assert outside.poll() is None and on_node2.poll() is None
            assert set(hosts.pids_on("node2")) == node2_before
            assert hosts.run_on("node2", "hostname").stdout.strip() == "node2"
            assert hosts.run_on("node1", "true", check=False).returncode == 255  # ssh: connection refused
    finally:
        outside.kill()


def test_teardown_leaves_nothing_behind() -> None:
    hosts = VirtualHosts(nodes=("node1",))
    with hosts:
        assert hosts.leftovers()  # proves leftovers() sees the live instance
        sshd_pids = hosts.pids_on("node1")
        assert sshd_pids
    assert hosts.leftovers() == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in sshd_pids)


def test_sbatch_wrap_hostname_runs_on_a_node(slurm_cluster: SlurmCluster) -> None:
    job_id = slurm_cluster.sbatch(None, "--wrap", "hostname")
    slurm_cluster.wait_state(job_id, "COMPLETED")
    node = slurm_cluster.job_info(job_id)["NodeList"]
    assert node in slurm_cluster.nodes
    assert slurm_cluster.output_path(job_id).read_text().split() == [node]


def test_two_node_batch_script_srun_runs_on_both_nodes(slurm_cluster: SlurmCluster) -> None:
    script = "#!/bin/bash\n#SBATCH --nodes=2 --ntasks=2\nsrun -N2 -n2 hostname\n"
    job_id = slurm_cluster.sbatch(script)
    slurm_cluster.wait_state(job_id, "COMPLETED")
    assert sorted(slurm_cluster.output_path(job_id).read_text().split()) == ["node1", "node2"]


def test_scancel_ends_a_running_job_and_leaves_no_process_on_the_nodes(slurm_cluster: SlurmCluster) -> None:
    job_id = slurm_cluster.sbatch(None, "--wrap", "sleep 300")
    slurm_cluster.wait_state(job_id, "RUNNING")
    node = slurm_cluster.job_info(job_id)["NodeList"]
    wait_for_command_on(slurm_cluster.hosts, node, b"sleep\x00300")
    slurm_cluster.scancel(job_id)
    slurm_cluster.wait_state(job_id, "CANCELLED", timeout=15)
    deadline = time.monotonic() + 10
    while left := {n: slurm_cluster.job_processes(n) for n in slurm_cluster.nodes if slurm_cluster.job_processes(n)}:
        assert time.monotonic() < deadline, f"processes left on the nodes after scancel: {left}"
        time.sleep(0.1)


def test_a_set_up_that_fails_half_way_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_check(self: VirtualHosts) -> None:
        raise HarnessError("ssh check broken on purpose")

    monkeypatch.setattr(VirtualHosts, "_check_ssh", broken_check)
    hosts = VirtualHosts(nodes=("node1",))
    with pytest.raises(HarnessError, match="on purpose"):
        hosts.__enter__()
    assert hosts.leftovers() == []


def test_a_new_instance_removes_what_a_killed_one_left() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tests.multinode.hosts import VirtualHosts\n"
         "hosts = VirtualHosts(nodes=('node1',)).__enter__()\nprint(hosts.suffix, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        stale_suffix = owner.stdout.readline().strip()
    finally:
        owner.kill()  # SIGKILL: no teardown runs, as when a test run is killed
        owner.wait()
    assert stale_suffix, "the owner process did not set up its virtual hosts"
    stale = VirtualHosts(nodes=("node1",))
    stale.suffix = stale_suffix
    assert any("mnh-" in item for item in stale.leftovers())
    with VirtualHosts(nodes=("node1",)):
        assert stale.leftovers() == []
