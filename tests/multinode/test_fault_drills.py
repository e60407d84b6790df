"""Fault drills on a two-host cluster (one trainer rank and one engine on each of node1 and node2, over ssh).

In order, on one cluster: SIGKILL node2's trainer rank in the middle of a forward_backward
(the launcher restarts the group on both hosts, the controller rebuilds the run: same
result, same later losses as a reference run); SIGKILL node2's engine in the middle of a
sample (re-queued on node1's engine: same tokens; the engine comes back over ssh); then
lose node2 altogether (every process in its namespace, sshd included): the group cannot be
restarted there, so training is lost (healthz "degraded", 503 with a detail, the pending
call fails saying so, naming the latest checkpoint) while node1's engine keeps sampling.
Each prints a row of the README's fault-drill table. Last, the probe kills a run, drains
and shuts the cluster down (nothing left on node1). Own VirtualHosts: kill_node must not
take the shared fixture's slurmd with it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from tinker import types

from cluster.faults import ENV as FAULTS_ENV
from tests.e2e.conftest import (  # noqa: F401  (models_dir: the fixture)
    BUILTIN_MODEL, assert_training_refused, launch_cluster, models_dir, probe, probe_json, wait_until,
)
from tests.e2e.pig_latin import WORDS, sft_batch
from tests.multinode.hosts import VirtualHosts
from tests.multinode.test_hostfile_cluster import hostfile_flags, processes_on_nodes

ADAM = types.AdamParams(learning_rate=5e-3)
STEPS = 4


@pytest.fixture(scope="module")
def hosts():
    with VirtualHosts() as virtual_hosts:
        yield virtual_hosts


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")  # one filesystem: the namespaces share it


@pytest.fixture(scope="module")
def running(hosts, faults, tmp_path_factory, models_dir):  # noqa: F811
    directory = tmp_path_factory.mktemp("drills")
    with launch_cluster(directory / "state", models_dir, *hostfile_flags(hosts, directory),
                        "--heartbeat-timeout", "3", env={FAULTS_ENV: str(faults)}) as cluster:
        yield cluster
    assert processes_on_nodes(hosts)["node1"] == []  # node2 is gone; nothing of ours may be left on node1


@pytest.fixture(scope="module")
def client(running):
    return running.service_client()


@pytest.fixture(scope="module")
def reference(client):
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=11).result()
    data = sft_batch(tc.get_tokenizer(), WORDS[:16] * 4)
    losses = []
    for _ in range(STEPS):
        losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    return tc, data, losses



def _worker(running, name: str) -> str:
    return next(row["state"] for row in probe_json(running, "status")["rows"] if row["name"] == name)



def _pid_on(hosts: VirtualHosts, node: str, module: str) -> int:
    for pid in hosts.pids_on(node):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in words and b"torch.distributed.run" not in words:
            return pid
    raise LookupError(f"no {module} on {node}")


def _stopped_in_a_pass(hosts: VirtualHosts, faults: Path, submit):
    """Submit a forward_backward and return it once node2's rank has stopped itself inside it
    (a sigstop fault): without that, a fast machine may finish the pass before the fault."""
    pid = _pid_on(hosts, "node2", "actors.trainer.main")
    (faults / "trainer1.TrainerForwardBackwardReq").write_text("sigstop")
    pending = submit()
    wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 30,
               "node2's rank to stop in the pass")
    return pid, pending


def _row(fault: str, hit: float, detected: float, back: float | None, done: float, saw: str) -> None:
    row = {"fault": fault, "detect_s": round(detected - hit, 2),
           "back_s": None if back is None else round(back - hit, 2), "call_done_s": round(done - hit, 2),
           "client_saw": saw}
    print("FAULT-DRILL", json.dumps(row))


def test_a_rank_killed_on_the_other_host_is_invisible_to_the_client(running, client, reference, hosts, faults):
    _, data, expected = reference
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=11).result()
    losses = []
    for step in range(STEPS):
        if step == 2:
            deaths = probe_json(running, "status")["info"]["trainer_group"]["deaths"]
            pid, pending = _stopped_in_a_pass(hosts, faults, lambda: tc.forward_backward(data, "cross_entropy"))
            os.kill(pid, signal.SIGKILL)
            hit = time.monotonic()
            detected = wait_until(lambda: probe_json(running, "status")["info"]["trainer_group"]["deaths"] > deaths, 30, "detection")
            back = wait_until(lambda: probe_json(running, "status")["info"]["trainer_group"]["state"] == "ready", 180, "restart")
            out = pending.result()
            _row("SIGKILL trainer rank 1 (node2) mid forward_backward, 2 hosts", hit, detected, back,
                 time.monotonic(), "the normal result")
        else:
            out = tc.forward_backward(data, "cross_entropy").result()
        losses.append(out.metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    assert losses == expected
    recovery = next(row["recovery"] for row in probe_json(running, "runs")["rows"] if row["model_id"] == tc.model_id)
    print("SNAPSHOTS", json.dumps(recovery))  # the default budget's cost on this model, for the README
    assert recovery["snapshots"] >= 1 and recovery["generation"] == 2


def test_an_engine_killed_mid_sample_hands_its_sample_to_the_other_host(running, client, reference, hosts):
    tc, _, _ = reference
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    params = types.SamplingParams(max_tokens=1500, temperature=0.0, stop=[])
    expected = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    first = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params)  # engine0 (node1)
    time.sleep(0.2)
    second = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params)  # engine1 (node2)
    time.sleep(0.5)
    os.kill(_pid_on(hosts, "node2", "actors.engine.main"), signal.SIGKILL)
    hit = time.monotonic()
    detected = wait_until(lambda: _worker(running, "engine1") != "ready", 30, "detection")
    results = [first.result(), second.result()]
    done = time.monotonic()
    back = wait_until(lambda: _worker(running, "engine1") == "ready", 180, "engine restart")
    assert [r.sequences[0].tokens for r in results] == [expected.sequences[0].tokens] * 2
    _row("SIGKILL engine 1 (node2) mid sample, 2 hosts", hit, detected, back, done,
         "the normal result (re-queued on engine 0)")


def test_a_lost_host_leaves_sampling_up_and_training_refused(running, client, reference, hosts, faults):
    tc, data, _ = reference
    saved = tc.save_state("before-the-loss").result().path
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    expected = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    _, pending = _stopped_in_a_pass(hosts, faults, lambda: tc.forward_backward(data, "cross_entropy"))
    hosts.kill_node("node2")
    hit = time.monotonic()
    detected = wait_until(lambda: probe_json(running, "status")["info"]["trainer_group"]["state"] != "ready", 30, "detection")
    with pytest.raises(Exception, match="training is unavailable") as failure:
        pending.result()
    done = time.monotonic()
    assert saved in str(failure.value)  # the client learns where to resume from
    lost = wait_until(lambda: _worker(running, "engine1") == "lost", 120, "engine 1 given up")
    health = assert_training_refused(running, tc.model_id, "could not be restarted")
    assert probe_json(running, "status")["info"]["degraded"] == health["detail"]
    again = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    assert again.sequences[0].tokens == expected.sequences[0].tokens
    _row("lose node2 (all its processes, sshd too) mid forward_backward", hit, detected, lost, done,
         "a clear error naming the latest checkpoint; sampling continues on node1")


def test_the_probe_kills_a_run_drains_and_shuts_the_two_host_cluster_down(running, client, reference, hosts):
    """The probe's steering subcommands on this (degraded) 2-host cluster; its listings are in
    test_hostfile_cluster.py. Shutdown must stop what is left on node1 too."""
    tc, _, _ = reference
    assert probe_json(running, "kill-run", tc.model_id)["info"]["killed"] == tc.model_id
    assert tc.model_id not in [row["model_id"] for row in probe_json(running, "runs")["rows"]]
    assert probe_json(running, "drain")["info"]["draining"] is True
    with running.http_client() as http:
        refused = http.post("/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
    assert refused.status_code == 503 and "draining" in refused.json()["detail"]
    probe(running, "shutdown")
    assert running.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 20
    while processes_on_nodes(hosts)["node1"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_on_nodes(hosts)["node1"] == []
