"""The admin probe (`python -m launch.probe`) against a real cluster: every subcommand, as JSON and as a table.

The probe talks zmq to the controller with the token the launcher wrote (mode 0600); the
SDK makes the sessions, runs and futures it lists. drain and shutdown change the cluster,
so they run last, in that order.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
import tinker

from tests.e2e.conftest import BUILTIN_MODEL, _processes_mentioning, launch_cluster, probe, probe_json
from tests.e2e.pig_latin import sft_batch, train_steps

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def running(tmp_path_factory, models_dir):
    with launch_cluster(tmp_path_factory.mktemp("probe-state"), models_dir, "--max-adapters", "4") as cluster:
        yield cluster



@pytest.fixture(scope="module")
def trained(running):
    client = running.service_client()
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=2).result()
    train_steps(tc, sft_batch(tc.get_tokenizer(), ["hello", "world"]), steps=1)
    return client, tc


def test_the_token_is_private_and_required(running):
    token = running.state_dir / "run" / "admin.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    saved = token.read_text()
    try:
        token.write_text("0" * 64)
        out = probe(running, "status", expect_rc=1)
        assert "401" in out.stderr and "wrong or missing admin token" in out.stderr
    finally:
        token.write_text(saved)


def test_status_names_every_worker_with_its_pid_and_heartbeat(running, trained):
    status = probe_json(running, "status")
    assert status["info"]["model"] == BUILTIN_MODEL and status["info"]["layout"] == "dp=1 tp=1 pp=1"
    assert status["info"]["uptime_s"] > 0 and status["info"]["draining"] is False
    workers = {row["name"]: row for row in status["rows"]}
    assert set(workers) == {"trainer0", "engine0", "api"}
    for name in ("trainer0", "engine0"):
        row = workers[name]
        assert row["state"] == "ready" and row["heartbeat_age_s"] < 5 and row["rss_mib"] > 10
        cmdline = open(f"/proc/{row['pid']}/cmdline", "rb").read()
        assert (b"actors.trainer.main" if name == "trainer0" else b"actors.engine.main") in cmdline
        assert row["host"] == os.uname().nodename
    assert workers["api"]["state"] == "up"
    table = probe(running, "status").stdout
    assert "uptime_s:" in table and "trainer0" in table and "heartbeat_age_s" in table.splitlines()[-4]


def test_sessions_runs_and_futures_list_the_sdks_work(running, trained):
    _, tc = trained
    model_id = tc.model_id
    runs = probe_json(running, "runs")
    (run,) = [r for r in runs["rows"] if r["model_id"] == model_id]
    assert run["user"] and run["adapter_slot"] >= 1 and run["lora_rank"] == 4 and run["queue_depth"] == 0
    assert runs["info"]["max_adapters"] == 4
    sessions = probe_json(running, "sessions")
    (session,) = [s for s in sessions["rows"] if s["session_id"] == run["session_id"]]
    assert session["runs"] == 1 and session["adapter_slots"] == [run["adapter_slot"]] and session["state"] == "live"
    futures = probe_json(running, "futures", "--recent", "5")
    assert 1 <= len(futures["rows"]) <= 5 + futures["info"]["pending"]
    assert {f["state"] for f in futures["rows"]} <= {"pending", "finished", "failed"}
    assert model_id in probe(running, "runs").stdout


def test_kill_run_frees_the_slot_and_the_run_is_gone(running, trained):
    client, _ = trained
    victim = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=3).result()
    before = probe_json(running, "runs")["info"]["free_slots"]
    killed = probe_json(running, "kill-run", victim.model_id)
    assert killed["info"]["killed"] == victim.model_id
    deadline = time.monotonic() + 10
    while probe_json(running, "runs")["info"]["free_slots"] != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(tinker.APIStatusError, match="dropped by an administrator"):
        victim.forward(sft_batch(victim.get_tokenizer(), ["apple"]), "cross_entropy").result()
    out = probe(running, "kill-run", victim.model_id, expect_rc=1)
    assert "404" in out.stderr


def test_drain_refuses_new_work_then_shutdown_stops_everything(running, trained):
    client, tc = trained
    pending = tc.forward(sft_batch(tc.get_tokenizer(), ["token"]), "cross_entropy")
    drained = probe_json(running, "drain")
    assert drained["info"]["draining"] is True
    assert pending.result().loss_fn_outputs  # queued before the drain: it finishes
    # raw HTTP: the SDK would keep retrying a 503, as it should for a server that is going away
    with running.http_client() as http:
        refused = http.post("/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
    assert refused.status_code == 503 and "draining" in refused.json()["detail"]
    assert probe_json(running, "status")["info"]["draining"] is True
    probe(running, "shutdown")
    assert running.proc.wait(timeout=60) == 0
    marker = str(running.state_dir / "run" / "cluster.json")
    deadline = time.monotonic() + 10
    while _processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(marker)
    assert "shut down by the admin probe" in running.proc.stdout.read()
