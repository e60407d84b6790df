"""A dead or hung trainer rank: the launcher restarts the whole group, the controller rebuilds every run.

One cluster, two data-parallel trainer ranks, driven by the SDK. A reference run trains
undisturbed; a second run with the same seed and data trains while a rank SIGKILLs itself
as it starts a step's forward_backward (cluster/faults.py: a known point, the call in
flight, its peer inside the step), and another run while a rank SIGSTOPs itself there (a
hang: alive, silent). Each
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

from cluster.faults import ENV as FAULTS_ENV
from cluster.messages import AdminStatusReq
from launch.probe import ask
from tests.e2e.conftest import BUILTIN_MODEL, assert_training_refused, launch_cluster, wait_until
from tests.e2e.pig_latin import WORDS, sft_batch
from tests.e2e.test_data_parallel import _trainer_rank_pid

pytestmark = pytest.mark.e2e

STEPS = 6
RESTARTS = 6  # the tests below spend 5: one each for the first two and the shared pass, two for the run that kills it
ADAM = types.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """Where a test drops `trainer<R>.TrainerForwardBackwardReq` saying sigkill or sigstop (cluster/faults.py): the
    rank signals itself as it starts that step's forward_backward, while its peer is in the step too."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def running(tmp_path_factory, models_dir, faults):
    # a tiny snapshot budget: after the first step's snapshot, the rebuild must replay the log (the 2-host drills
    # run with the default budget, where a snapshot follows nearly every step of this tiny model)
    with launch_cluster(tmp_path_factory.mktemp("recovery"), models_dir, "--trainer-ranks", "2",
                        "--heartbeat-timeout", "3", "--snapshot-budget", "0.001", "--trainer-restarts", str(RESTARTS),
                        env={FAULTS_ENV: str(faults)}) as cluster:
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
    return sft_batch(reference_run.get_tokenizer(), WORDS[:16] * 4)


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



def _drill(running, faults, fault: str, rank: int, action: str, submit) -> dict:
    """Have trainer `rank` send itself `action` (sigkill, sigstop) inside the forward_backward that `submit` sends;
    time detection and recovery from the submission; print the table row; return the call's result."""
    before = _status(running)["trainer_group"]
    (faults / f"trainer{rank}.TrainerForwardBackwardReq").write_text(action)
    hit = time.monotonic()
    pending = submit()
    detected = wait_until(lambda: _status(running)["trainer_group"]["deaths"] > before["deaths"], 30, "detection")
    back = wait_until(lambda: _status(running)["trainer_group"]["generation"] > before["generation"], 120,
                      "restart")
    result = pending.result()
    done = time.monotonic()
    assert not list(faults.iterdir())  # the fault fired
    row = {"fault": fault, "detect_s": round(detected - hit, 2), "group_back_s": round(back - hit, 2),
           "call_done_s": round(done - hit, 2), "client_saw": "the normal result"}
    print("FAULT-DRILL", json.dumps(row))
    return result


def test_a_rank_killed_mid_step_is_invisible_to_the_client(running, faults, client, data, reference):
    ref_tc, ref_losses = reference
    probe_before = ref_tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result()
    losses = []
    for step in range(STEPS):
        def submit():
            return tc.forward_backward(data, "cross_entropy")
        if step == 3:  # after a snapshot and with a replay log: both are used
            out = _drill(running, faults, "SIGKILL trainer rank 1 mid forward_backward (1 host, 2 ranks)", 1,
                         "sigkill", submit)
        else:
            out = submit().result()
        losses.append(out.metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    assert losses == ref_losses  # bit for bit: snapshot + replay rebuilt exactly the same state
    log = (running.state_dir / "logs" / "controller.log").read_text()
    # the first step's snapshot, then steps 1 and 2 (forward_backward + optim_step each) replayed; step 3's
    # forward_backward was in flight (not logged), so it ran once more, after the rebuild
    assert f"{tc.model_id} rebuilt in trainer generation 2: snapshot + 4 replayed request(s)" in log, log[-3000:]
    # the other tenant's idle run came back too, as it was
    assert ref_tc.forward(data, "cross_entropy").result().metrics["loss:sum"] == probe_before
    workers = httpx.get(running.base_url + "/api/v1/healthz", timeout=10).json()["workers"]
    assert workers["trainer0"] == workers["trainer1"] == "ready"


def test_a_stopped_rank_is_found_hung_killed_and_replaced(running, faults, client, data, reference):
    ref_tc, ref_losses = reference
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result()
    losses = []
    for step in range(3):
        def submit():
            return tc.forward_backward(data, "cross_entropy")
        if step == 1:
            out = _drill(running, faults, "SIGSTOP trainer rank 0 mid forward_backward (a hang; heartbeat timeout "
                         "3 s)", 0, "sigstop", submit)
        else:
            out = submit().result()
        losses.append(out.metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    assert losses == ref_losses[:3]


def test_a_shared_pass_that_dies_runs_again_request_by_request(running, faults, client, data, reference):
    """Two runs' forward_backwards share a clock cycle's pass when a rank dies in it: nobody knows whose batch
    killed the group, so on the restarted group each runs alone, and both get the result they would have had."""
    ref_tc, ref_losses = reference
    runs = [client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=7).result() for _ in range(2)]
    deaths = _status(running)["trainer_group"]["deaths"]
    (faults / "trainer1.TrainerForwardBackwardReq.shared").write_text("sigkill")  # fires in a pass of several runs
    passes = _status(running)["clock_cycles"]["passes"]
    blocker = ref_tc.forward(data * 8, "cross_entropy")  # keeps the trainer busy while both requests queue
    wait_until(lambda: _status(running)["clock_cycles"]["passes"] > passes, 30, "the blocking pass")
    pending = [tc.forward_backward(data, "cross_entropy") for tc in runs]
    blocker.result()
    results = [p.result() for p in pending]
    assert _status(running)["trainer_group"]["deaths"] == deaths + 1 and not list(faults.iterdir())
    assert [r.metrics["loss:sum"] for r in results] == [ref_losses[0]] * 2  # each ran alone, as the reference did
    log = (running.state_dir / "logs" / "controller.log").read_text()
    assert "a shared pass of 2 requests" in log and "running them one by one" in log, log[-3000:]
    for tc in runs:
        tc.optim_step(ADAM).result()


def test_a_run_that_kills_the_trainer_every_time_fails_naming_its_checkpoint(running, faults, client, data,
                                                                              reference):
    """Its forward_backward kills rank 0 each time it runs (rebuild replays included): after two deaths in a row
    the run is given up, its request fails naming its latest checkpoint, and the other run trains on."""
    ref_tc, _ = reference
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=9).result()
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    saved = tc.save_state("last-good").result().path
    fault = faults / "trainer0.TrainerForwardBackwardReq"
    fault.write_text("sigkill")
    pending = tc.forward_backward(data, "cross_entropy")
    deaths = _status(running)["trainer_group"]["deaths"]
    wait_until(lambda: _status(running)["trainer_group"]["deaths"] > deaths, 60, "the first death")
    fault.write_text("sigkill")  # armed again for the rebuilt group
    with pytest.raises(Exception, match="died 2 times in a row while this run's requests ran") as failure:
        pending.result()
    assert saved in str(failure.value)
    with pytest.raises(Exception, match="died 2 times in a row"):  # the run is gone, and says why
        tc.forward(data, "cross_entropy").result()
    fault.unlink(missing_ok=True)
    assert ref_tc.forward(data, "cross_entropy").result().metrics["loss:sum"] > 0


def test_past_the_restart_limit_training_is_refused_and_sampling_goes_on(running, client, data, reference):
    ref_tc, _ = reference
    sampler = ref_tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    expected = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    while (group := _status(running)["trainer_group"])["state"] != "lost":
        assert group["deaths"] <= RESTARTS + 1, group
        if group["state"] == "ready":
            os.kill(_trainer_rank_pid(running.state_dir, 0), signal.SIGKILL)
            wait_until(lambda: _status(running)["trainer_group"]["deaths"] > group["deaths"], 30, "detection")
        time.sleep(0.2)
    assert_training_refused(running, ref_tc.model_id, "trainer group")
    again = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    assert again.sequences[0].tokens == expected.sequences[0].tokens
