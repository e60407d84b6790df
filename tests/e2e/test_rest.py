"""The REST endpoints through the SDK's own RestClient: training runs, checkpoints, sessions, downloads.

Plus the two polling features the SDK opts into from client/config and dynamic_config:
batched completion polling (`retrieve_futures`) and `cancel_future`, on the wire.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import tinker
from safetensors.numpy import load
from tinker import types

from tests.e2e.conftest import API_KEY, BUILTIN_MODEL
from tests.e2e.pig_latin import WORDS, sft_batch, train_steps

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(cluster):
    sc = cluster.service_client()
    yield sc
    sc.close("success").result()


@pytest.fixture(scope="module")
def rest(cluster):
    return tinker.RestClient(base_url=cluster.base_url, api_key=API_KEY)


@pytest.fixture(scope="module")
def http(cluster):
    with cluster.http_client() as c:
        yield c


@pytest.fixture(scope="module")
def run(client):
    """A trained run with a checkpoint of every kind, one named like a route (`publish`)."""
    tc = client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=3,
                                            user_metadata={"purpose": "rest-test"}).result()
    train_steps(tc, sft_batch(tc.get_tokenizer(), WORDS[:4]), steps=1)
    paths = {"state": tc.save_state("r-state", ttl_seconds=7200).result().path,
             "sampler": tc.save_weights_for_sampler("r-sampler").result().path,
             "external": tc.save_weights_external("r-export").result().path,
             "publish": tc.save_state("publish", user_metadata={"note": "named like a route"}).result().path}
    return tc, paths


def _checkpoint_dir(cluster, tinker_path: str) -> Path:
    return Path(cluster.state_dir) / "checkpoints" / tinker_path.removeprefix("tinker://")


def _by_id(rest, run_id: str) -> dict:
    return {c.checkpoint_id: c for c in rest.list_checkpoints(run_id).result().checkpoints}


def test_a_training_run_shows_its_spec_owner_and_latest_checkpoints(rest, run):
    tc, paths = run
    got = rest.get_training_run(tc.model_id).result()
    assert (got.base_model, got.is_lora, got.lora_rank, got.corrupted) == (BUILTIN_MODEL, True, 8, False)
    assert got.model_owner.startswith("key-") and got.user_metadata == {"purpose": "rest-test"}
    assert got.last_checkpoint.tinker_path == paths["publish"]
    assert got.last_sampler_checkpoint.tinker_path == paths["sampler"]
    assert abs(datetime.now(timezone.utc) - got.last_request_time) < timedelta(minutes=5)
    assert rest.get_training_run_by_tinker_path(paths["state"]).result().training_run_id == tc.model_id


def test_training_runs_are_paged_newest_first(rest, run):
    tc, _ = run
    first = rest.list_training_runs(limit=2, offset=0).result()
    assert first.training_runs[0].training_run_id == tc.model_id  # the newest
    assert (first.cursor.offset, first.cursor.limit) == (0, 2) and first.cursor.total_count >= 1
    if first.cursor.total_count > 1:
        second = rest.list_training_runs(limit=2, offset=1).result()
        assert second.training_runs[0].training_run_id == first.training_runs[1].training_run_id


def test_checkpoints_of_a_run_and_of_the_user(rest, run):
    tc, paths = run
    listed = _by_id(rest, tc.model_id)
    assert {k: c.checkpoint_type for k, c in listed.items()} == {
        "weights/r-state": "training", "sampler_weights/r-sampler": "sampler",
        "external_weights/r-export": "external", "weights/publish": "training"}
    state = listed["weights/r-state"]
    assert state.tinker_path == paths["state"] and state.size_bytes > 0 and not state.public
    assert abs(state.expires_at - state.time - timedelta(seconds=7200)) < timedelta(seconds=5)
    assert listed["weights/publish"].user_metadata == {"note": "named like a route"}
    assert listed["sampler_weights/r-sampler"].expires_at is None

    page = rest.list_user_checkpoints(limit=2, offset=0).result()
    assert len(page.checkpoints) == 2 and page.cursor.total_count >= 4
    assert page.checkpoints[0].time >= page.checkpoints[1].time
    rest_of_them = rest.list_user_checkpoints(limit=1000, offset=2).result()
    assert len(rest_of_them.checkpoints) == page.cursor.total_count - 2


def test_publish_ttl_and_delete(cluster, rest, run):
    tc, paths = run
    rest.publish_checkpoint_from_tinker_path(paths["state"]).result()
    rest.publish_checkpoint_from_tinker_path(paths["publish"]).result()  # URL …/weights/publish/publish
    listed = _by_id(rest, tc.model_id)
    assert listed["weights/r-state"].public and listed["weights/publish"].public
    rest.unpublish_checkpoint_from_tinker_path(paths["state"]).result()
    assert not _by_id(rest, tc.model_id)["weights/r-state"].public

    rest.set_checkpoint_ttl_from_tinker_path(paths["state"], None).result()
    assert _by_id(rest, tc.model_id)["weights/r-state"].expires_at is None
    rest.set_checkpoint_ttl_from_tinker_path(paths["sampler"], 1).result()
    time.sleep(1.2)  # expired: invisible at once; the controller's sweep deletes the files later
    assert "sampler_weights/r-sampler" not in _by_id(rest, tc.model_id)

    directory = _checkpoint_dir(cluster, paths["publish"])
    assert directory.is_dir()
    rest.delete_checkpoint_from_tinker_path(paths["publish"]).result()  # DELETE …/weights/publish
    assert "weights/publish" not in _by_id(rest, tc.model_id) and not directory.exists()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(paths["publish"]).result()


def test_weights_info(rest, run):
    _, paths = run
    info = rest.get_weights_info_by_tinker_path(paths["state"]).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == (BUILTIN_MODEL, True, 8)
    assert info.train_attn and info.train_mlp and info.train_unembed


def test_external_weights_are_served_by_the_server_itself(cluster, rest, http, run):
    tc, paths = run
    urls = rest.get_external_weights_urls(paths["external"]).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    assert urls.expires > datetime.now(timezone.utc) + timedelta(minutes=30)
    directory = _checkpoint_dir(cluster, paths["external"])
    for name, url in urls.urls.items():
        assert url.startswith(cluster.base_url)
        with urllib.request.urlopen(url, timeout=30) as resp:  # a plain GET, no API key: the token is in the URL
            assert resp.read() == (directory / name).read_bytes()
    tensors = load((directory / "adapter_model.safetensors").read_bytes())
    assert any(k.endswith("lora_A.weight") for k in tensors)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urls.urls["adapter_config.json"].replace("/checkpoint_files/", "/checkpoint_files/x"))
    assert err.value.code == 404
    resp = http.get(f"/training_runs/{tc.model_id}/checkpoints/weights/r-state/external_weights_urls")
    assert resp.status_code == 400 and "save_weights_external" in resp.json()["detail"]


def test_sessions_and_samplers(client, rest, run):
    tc, _ = run
    session_id = tc.model_id.split(":train:")[0]
    path = tc.save_weights_for_sampler("s-sampler").result().path
    client.create_sampling_client(model_path=path).result()
    assert session_id in rest.list_sessions(limit=1000).result().sessions
    session = rest.get_session(session_id).result()
    assert tc.model_id in session.training_run_ids
    samplers = [rest.get_sampler(sampler_id).result() for sampler_id in session.sampler_ids]
    assert [(s.base_model, s.model_path) for s in samplers if s.model_path] == [(BUILTIN_MODEL, path)]
    assert all(s.sampler_id.startswith(f"{session_id}:sample:") for s in samplers)


def test_unknown_ids_and_bad_parameters_are_clear_4xx(rest, http, run):
    tc, _ = run
    with pytest.raises(tinker.NotFoundError, match="unknown training run"):
        rest.get_training_run("no-such-session:train:0").result()
    cases = [
        (http.get("/training_runs", params={"limit": 0}), 400, "limit"),
        (http.get("/training_runs", params={"access_scope": "everyone"}), 400, "access_scope"),
        (http.get("/training_runs/no-such:train:0/checkpoints"), 404, "unknown training run"),
        (http.put(f"/training_runs/{tc.model_id}/checkpoints/weights/r-state/ttl", json={"ttl_seconds": -5}),
         400, "ttl_seconds"),
        (http.put(f"/training_runs/{tc.model_id}/checkpoints/weights/r-state/ttl", json={}), 400, "ttl_seconds"),
        (http.delete(f"/training_runs/{tc.model_id}/checkpoints/weights/never-saved"), 404, "no checkpoint"),
        (http.post("/weights_info", json={"tinker_path": "tinker://x:train:0/weights/y"}), 404, "no checkpoint"),
        (http.get("/sessions/no-such-session"), 404, "unknown session"),
        (http.get("/samplers/no-such:sample:0"), 404, "unknown sampler"),
    ]
    for resp, status, word in cases:
        assert resp.status_code == status, resp.text
        assert word in resp.json()["detail"], resp.text


def test_retrieve_futures_reports_completions_after_the_cursor_and_cancel_stops_a_sample(http):
    session_id = http.post("/create_session", json={"sdk_version": "raw"}).json()["session_id"]
    sampler = http.post("/create_sampling_session", json={
        "session_id": session_id, "sampling_session_seq_id": 0, "base_model": BUILTIN_MODEL}).json()
    target = {"type": "sampling_session", "sampling_session_id": sampler["sampling_session_id"],
              "cloned_sampler_id": 0}

    def sample(seq_id: int, max_tokens: int) -> str:
        return http.post("/asample", json={
            "sampling_session_id": sampler["sampling_session_id"], "seq_id": seq_id, "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
            "sampling_params": {"max_tokens": max_tokens, "stop": []}}).json()["request_id"]

    short = sample(0, 2)
    polled = http.post("/retrieve_futures", json={"target": target, "prev_cursor": 0}).json()  # long-polls
    assert polled["completions"] == [{"state": "finished", "request_id": short}]
    again = http.post("/retrieve_futures", json={"target": target, "prev_cursor": polled["cursor"], "timeout": 0})
    assert again.json() == {"completions": [], "cursor": polled["cursor"]}
    result = http.post("/retrieve_future", json={"request_id": short}).json()
    assert [len(s["tokens"]) for s in result["sequences"]] == [2, 2]

    long = sample(1, 3000)
    assert http.post("/cancel_future", json={"request_id": long}).json() == {"cancelled": True}
    failed = http.post("/retrieve_future", json={"request_id": long}).json()
    assert "cancelled" in failed["error"] and failed["category"] == "user"
    polled = http.post("/retrieve_futures", json={"target": target, "prev_cursor": polled["cursor"]}).json()
    assert polled["completions"] == [{"state": "failed", "request_id": long}]
    assert http.post("/cancel_future", json={"request_id": long}).json() == {"cancelled": False}
    assert http.post("/cancel_future", json={"request_id": "req-nope"}).status_code == 404
    http.post(f"/sessions/{session_id}/finish", json={"reason": {"type": "success"}})


def test_the_sdk_samples_through_retrieve_futures(client):
    sampler = client.create_sampling_client(base_model=BUILTIN_MODEL).result()
    futures = [sampler.sample(prompt=types.ModelInput.from_ints([5, 6, 7]), num_samples=1,
                              sampling_params=types.SamplingParams(max_tokens=3, seed=i)) for i in range(4)]
    assert [len(f.result().sequences[0].tokens) for f in futures] == [3, 3, 3, 3]
    assert sampler.holder.get_client_config().sample_use_retrieve_futures
