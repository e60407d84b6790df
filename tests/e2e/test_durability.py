"""Durable state: what survives a whole-server restart, an API-process restart, and a
session that stops heartbeating.

Each test starts its own cluster(s) on its own state dir: restarts and short session
timeouts must not disturb the shared session cluster.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, BUILTIN_MODEL, _processes_mentioning, launch_cluster
from tests.e2e.pig_latin import WORDS, sft_batch, train_steps

pytestmark = pytest.mark.e2e


def _raw_sample(http: httpx.Client) -> tuple[str, list[int]]:
    """Sample through the JSON wire directly, so the request_id is in our hands."""
    session_id = http.post("/create_session", json={"sdk_version": "raw"}).json()["session_id"]
    sampler = http.post("/create_sampling_session", json={
        "session_id": session_id, "sampling_session_seq_id": 0, "base_model": BUILTIN_MODEL}).json()
    request_id = http.post("/asample", json={
        "sampling_session_id": sampler["sampling_session_id"], "seq_id": 0, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
        "sampling_params": {"max_tokens": 4, "seed": 11, "stop": []}}).json()["request_id"]
    result = http.post("/retrieve_future", json={"request_id": request_id}).json()
    return request_id, result["sequences"][0]["tokens"]


def test_a_whole_server_restart_keeps_runs_checkpoints_and_settled_futures(tmp_path, models_dir):
    state_dir = tmp_path / "state"
    with launch_cluster(state_dir, models_dir) as first:
        sc = first.service_client()
        tc = sc.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=21).result()
        data = sft_batch(tc.get_tokenizer(), WORDS[:6])
        train_steps(tc, data, steps=2, learning_rate=2e-3)
        state_path = tc.save_state("before-restart").result().path
        sampler_path = tc.save_weights_for_sampler("sampler-before-restart").result().path
        losses_before = train_steps(tc, data, steps=2, learning_rate=2e-3)
        with first.http_client() as http:
            request_id, tokens = _raw_sample(http)
        sc.close("success").result()

    with launch_cluster(state_dir, models_dir) as second:
        rest = tinker.RestClient(base_url=second.base_url, api_key=API_KEY)
        assert tc.model_id in [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs]
        listed = {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
        assert {state_path, sampler_path} <= listed
        with second.http_client() as http:
            assert http.post("/retrieve_future", json={"request_id": request_id}).json()["sequences"][0][
                "tokens"] == tokens
            gone = http.post("/get_info", json={"model_id": tc.model_id})
            assert gone.status_code == 410 and "restarted" in gone.json()["detail"], gone.text

        sc = second.service_client()
        resumed = sc.create_training_client_from_state_with_optimizer(state_path).result()
        assert train_steps(resumed, data, steps=2, learning_rate=2e-3) == pytest.approx(losses_before, abs=1e-5)
        sampled = sc.create_sampling_client(model_path=sampler_path).result().sample(
            prompt=types.ModelInput.from_ints([5, 6, 7]), num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=3, seed=1)).result()
        assert len(sampled.sequences[0].tokens) == 3
        sc.close("success").result()


def _api_pid(cluster) -> int:
    marker = str(cluster.state_dir / "run" / "cluster.json")
    pids = [pid for pid in _processes_mentioning(marker) if "api.server" in open(f"/proc/{pid}/cmdline").read()]
    assert len(pids) == 1, pids
    return pids[0]


def test_killing_the_api_process_fails_no_training_step(tmp_path, models_dir):
    with launch_cluster(tmp_path / "state", models_dir) as running:
        sc = running.service_client()
        tc = sc.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=4).result()
        data = sft_batch(tc.get_tokenizer(), WORDS[:8])
        expected = train_steps(sc.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=4).result(),
                               data, steps=6, learning_rate=2e-3)

        adam = types.AdamParams(learning_rate=2e-3)
        futures = []
        for step in range(6):
            futures.append(tc.forward_backward(data, "cross_entropy"))
            futures.append(tc.optim_step(adam))
            if step == 2:  # mid-stream: steps queued, some running, results being polled
                old_pid = _api_pid(running)
                os.kill(old_pid, signal.SIGKILL)
        losses = [f.result().metrics["loss:sum"] for f in futures[0::2]]
        for f in futures[1::2]:
            f.result()
        assert _api_pid(running) != old_pid  # the launcher started a new one
        assert losses == pytest.approx(expected, abs=1e-5)
        sc.close("success").result()


def test_a_session_without_heartbeats_expires_and_frees_its_slot(tmp_path, models_dir):
    # the SDK heartbeats every 10 s: a 12 s timeout keeps it alive and expires a silent client
    with launch_cluster(tmp_path / "state", models_dir, "--session-timeout", "12", "--max-adapters", "2") as running:
        sc = running.service_client()
        kept = sc.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()
        data = sft_batch(kept.get_tokenizer(), WORDS[:2])
        with running.http_client() as http:
            # a raw client that never heartbeats takes the other slot
            session_id = http.post("/create_session", json={"sdk_version": "raw"}).json()["session_id"]
            created = http.post("/create_model", json={
                "session_id": session_id, "model_seq_id": 0, "base_model": BUILTIN_MODEL,
                "lora_config": {"rank": 4}}).json()
            http.post("/retrieve_future", json={"request_id": created["request_id"]}).raise_for_status()
            with pytest.raises(tinker.BadRequestError, match="slots are in use"):
                sc.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()
            deadline = time.monotonic() + 30
            while (info := http.post("/get_info", json={"model_id": created["model_id"]})).status_code == 200:
                assert time.monotonic() < deadline, "the silent session never expired"
                time.sleep(0.5)
            assert info.status_code == 410 and "expired" in info.json()["detail"], info.text
        # the heartbeating session outlived the timeout, and the freed slot can be taken again
        assert kept.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0
        assert sc.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result().get_info().lora_rank == 4
        sc.close("success").result()
