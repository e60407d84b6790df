"""A dead or hung trainer rank: the launcher restarts the whole group, the controller rebuilds every run.

One cluster, two data-parallel trainer ranks, driven by the SDK. A reference run trains
undisturbed; a second run with the same seed and data trains while a rank is SIGKILLed
in the middle of its forward_backward, and later SIGSTOPped (a hang: alive, silent). Each
time the pending call completes with the result it would have had, and every later loss
equals the reference run's, bit for bit; the reference run, idle meanwhile, is rebuilt
too. Past the launcher's restart limit the group is lost: healthz says so, training
answers 503 with a detail, sampling goes on. Each fault prints a row of the README's
fault-drill table (time to detect, time to recover, what the client saw).

The tests run in order on one cluster (each death spends one of the launcher's restarts).
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from tinker import types

from cluster.messages import AdminStatusReq
from launch.probe import ask
from launch.supervision import TRAINER_RESTARTS
from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster
from tests.e2e.pig_latin import WORDS, sft_batch
from tests.e2e.test_data_parallel import _trainer_rank_pid

pytestmark = pytest.mark.e2e

STEPS = 6
ADAM = types.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def running(tmp_path_factory, models_dir):
    with launch_cluster(tmp_path_factory.mktemp("recovery"), models_dir, "--trainer-ranks", "2",
                        "--heartbeat-timeout", "3") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(running):
    service = running.service_client()
    yield service
    service.close("success").result()


@pytest.fixture(scope="module")
def reference_run(client):
    return client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result()


@pytest.fixture(scope="module")
def data(reference_run):
    return sft_batch(reference_run.get_tokenizer(), WORDS[:16] * 4)  # a step long enough to be caught in flight


@pytest.fixture(scope="module")
def reference(reference_run, data):
    """The run that never crashed: its losses, and the run itself (idle while the others crash)."""
    tc = reference_run
    losses = []
    for _ in range(STEPS):
        losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    return tc, losses


def _status(running) -> dict:
    token = (running.state_dir / "run" / "admin.token").read_text().strip()
    return ask(running.state_dir, AdminStatusReq(token=token)).info


def _wait(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic()


def _drill(running, fault: str, rank: int, sig: int, pending) -> dict:
    """Send `sig` to trainer `rank` while `pending` runs; time detection and recovery; return the table row."""
    before = _status(running)["trainer_group"]
    pid = _trainer_rank_pid(running.state_dir, rank)
    time.sleep(0.3)  # the forward_backward is under way on both ranks
    os.kill(pid, sig)
    hit = time.monotonic()
    detected = _wait(lambda: _status(running)["trainer_group"]["deaths"] > before["deaths"], 30, "detection")
    back = _wait(lambda: _status(running)["trainer_group"]["generation"] > before["generation"], 120, "restart")
    result = pending.result()
    done = time.monotonic()
    row = {"fault": fault, "detect_s": round(detected - hit, 2), "group_back_s": round(back - hit, 2),
           "call_done_s": round(done - hit, 2), "client_saw": "the normal result"}
    print("FAULT-DRILL", json.dumps(row))
    return result


def test_a_rank_killed_mid_step_is_invisible_to_the_client(running, client, data, reference):
    ref_tc, ref_losses = reference
    probe_before = ref_tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result()
    losses = []
    for step in range(STEPS):
        pending = tc.forward_backward(data, "cross_entropy")
        if step == 3:  # after a snapshot and with a replay log: both are used
            out = _drill(running, "SIGKILL trainer rank 1 mid forward_backward (1 host, 2 ranks)", 1,
                         signal.SIGKILL, pending)
        else:
            out = pending.result()
        losses.append(out.metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    assert losses == ref_losses  # bit for bit: snapshot + replay rebuilt exactly the same state
    # the other tenant's idle run came back too, as it was
    assert ref_tc.forward(data, "cross_entropy").result().metrics["loss:sum"] == probe_before
    workers = httpx.get(running.base_url + "/api/v1/healthz", timeout=10).json()["workers"]
    assert workers["trainer0"] == workers["trainer1"] == "ready"


def test_a_stopped_rank_is_found_hung_killed_and_replaced(running, client, data, reference):
    ref_tc, ref_losses = reference
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result()
    losses = []
    for step in range(3):
        pending = tc.forward_backward(data, "cross_entropy")
        if step == 1:
            out = _drill(running, "SIGSTOP trainer rank 0 mid forward_backward (a hang; heartbeat timeout 3 s)",
                         0, signal.SIGSTOP, pending)
        else:
            out = pending.result()
        losses.append(out.metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    assert losses == ref_losses[:3]


def test_past_the_restart_limit_training_is_refused_and_sampling_goes_on(running, client, data, reference):
    ref_tc, _ = reference
    sampler = ref_tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    expected = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    while (group := _status(running)["trainer_group"])["state"] != "lost":
        assert group["deaths"] <= TRAINER_RESTARTS + 1, group
        if group["state"] == "ready":
            os.kill(_trainer_rank_pid(running.state_dir, 0), signal.SIGKILL)
            _wait(lambda: _status(running)["trainer_group"]["deaths"] > group["deaths"], 30, "detection")
        time.sleep(0.2)
    health = httpx.get(running.base_url + "/api/v1/healthz", timeout=10).json()
    assert health["status"] == "degraded" and "trainer group" in health["detail"], health
    with running.http_client() as http:
        resp = http.post("/optim_step", json={"model_id": ref_tc.model_id, "seq_id": 99, "type": "optim_step",
                                               "adam_params": {"learning_rate": 1e-3}})
    assert resp.status_code == 503 and "training is unavailable" in resp.json()["detail"], resp.text
    again = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    assert again.sequences[0].tokens == expected.sequences[0].tokens
