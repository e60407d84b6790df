"""Users own their work: API-key tenancy on a real cluster with an --api-keys-file.

alice has two keys, bob one, root is an admin. To bob, everything of alice's does not
exist (404), through the SDK and through raw HTTP, until alice publishes a checkpoint:
then bob may load and sample it, but not list, change or delete it (403). Admins see
everything. --max-adapters-per-user caps the training runs one user holds (429).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.e2e.conftest import BUILTIN_MODEL, launch_cluster
from tests.e2e.pig_latin import WORDS, chat_prompt, sft_batch, train_steps

pytestmark = pytest.mark.e2e

ALICE, ALICE_LAPTOP, BOB, ROOT = "tml-alice-1", "tml-alice-2", "tml-bob", "tml-root"
KEYS_FILE = f"""# users of this lab
{ALICE} alice
{ALICE_LAPTOP} alice
{BOB} bob
{ROOT} root admin
"""
PER_USER = 3


@pytest.fixture(scope="module")
def tenancy_cluster(tmp_path_factory, models_dir):
    state = tmp_path_factory.mktemp("tenancy")
    keys = state / "keys.txt"
    keys.write_text(KEYS_FILE)
    with launch_cluster(state / "state", models_dir, "--api-keys-file", str(keys),
                        "--max-adapters-per-user", str(PER_USER), "--max-adapters", "8") as running:
        yield running


@pytest.fixture(scope="module")
def clients(tenancy_cluster):
    made = {name: tenancy_cluster.service_client(key) for name, key in (("alice", ALICE), ("bob", BOB))}
    yield made
    for client in made.values():
        client.close("success").result()


@pytest.fixture(scope="module")
def alices(tenancy_cluster, clients):
    """alice's run with a checkpoint of every kind, a sampling session and a settled sample future."""
    tc = clients["alice"].create_lora_training_client(base_model=BUILTIN_MODEL, rank=8, seed=5).result()
    tokenizer = tc.get_tokenizer()
    train_steps(tc, sft_batch(tokenizer, WORDS[:4]), steps=1)
    paths = {"state": tc.save_state("a-state").result().path,
             "sampler": tc.save_weights_for_sampler("a-sampler").result().path,
             "external": tc.save_weights_external("a-export").result().path}
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(chat_prompt("hello"), add_special_tokens=False))
    with tenancy_cluster.http_client(api_key=ALICE) as http:
        submitted = http.post("/asample", json={
            "sampling_session_id": sampler._sampling_session_id, "seq_id": 10**6, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt.to_ints()}]},
            "sampling_params": {"max_tokens": 2}}).json()
    return {"tc": tc, "paths": paths, "sampler": sampler, "prompt": prompt, "request_id": submitted["request_id"],
            "session_id": tc.model_id.split(":train:")[0]}


def _fwdbwd_proto(model_id: str, seq_id: int, loss_fn: str = "cross_entropy") -> bytes:
    datum = pb.Datum()
    datum.model_input.add().encoded_text.tokens = np.arange(1, 4, dtype="<i4").tobytes()
    for name, dtype, values in (("target_tokens", pb.DTYPE_INT64, np.ones(3, "<i8")),
                                ("weights", pb.DTYPE_FLOAT32, np.ones(3, "<f4"))):
        tensor = datum.loss_fn_inputs[name]
        tensor.dtype, tensor.dense = dtype, values.tobytes()
        tensor.shape.append(3)
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn)
    req.data.append(datum)
    return req.SerializeToString()


def _cross_user_requests(a: dict) -> dict[str, tuple[str, str, dict | bytes | None]]:
    """Every way to name something of alice's: (method, path, JSON body or protobuf bytes)."""
    run, session = a["tc"].model_id, a["session_id"]
    state_id = a["paths"]["state"].split(f"{run}/", 1)[1]
    export_id = a["paths"]["external"].split(f"{run}/", 1)[1]
    sampling_session = a["sampler"]._sampling_session_id
    return {
        "get training run": ("GET", f"/training_runs/{run}", None),
        "list the run's checkpoints": ("GET", f"/training_runs/{run}/checkpoints", None),
        "get session": ("GET", f"/sessions/{session}", None),
        "heartbeat her session": ("POST", "/session_heartbeat", {"session_id": session}),
        "finish her session": ("POST", f"/sessions/{session}/finish", {"reason": {"type": "success"}}),
        "weights_info": ("POST", "/weights_info", {"tinker_path": a["paths"]["state"]}),
        "delete checkpoint": ("DELETE", f"/training_runs/{run}/checkpoints/{state_id}", None),
        "publish": ("POST", f"/training_runs/{run}/checkpoints/{state_id}/publish", None),
        "unpublish": ("DELETE", f"/training_runs/{run}/checkpoints/{state_id}/publish", None),
        "set TTL": ("PUT", f"/training_runs/{run}/checkpoints/{state_id}/ttl", {"ttl_seconds": 3600}),
        "export URLs": ("GET", f"/training_runs/{run}/checkpoints/{export_id}/external_weights_urls", None),
        "get_info on her model": ("POST", "/get_info", {"model_id": run}),
        "forward_backward on her model": ("POST", "/forward_backward", _fwdbwd_proto(run, 50)),
        "optim_step on her model": ("POST", "/optim_step", {"model_id": run, "seq_id": 51, "adam_params": {}}),
        "save_weights on her model": ("POST", "/save_weights", {"model_id": run, "seq_id": 52, "path": "x"}),
        "load_state into her model": ("POST", "/load_weights", {"model_id": run, "seq_id": 53,
                                                                 "path": a["paths"]["state"]}),
        "retrieve her future": ("POST", "/retrieve_future", {"request_id": a["request_id"]}),
        "cancel her future": ("POST", "/cancel_future", {"request_id": a["request_id"]}),
        "get her sampler": ("GET", f"/samplers/{sampling_session}", None),
        "sample her sampling session": ("POST", "/asample", {
            "sampling_session_id": sampling_session, "seq_id": 7, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "sampling_params": {}}),
        "poll her completions": ("POST", "/retrieve_futures", {
            "target": {"type": "sampling_session", "sampling_session_id": sampling_session}, "timeout": 0}),
        "create a model in her session": ("POST", "/create_model", {
            "session_id": session, "model_seq_id": 90, "base_model": BUILTIN_MODEL}),
        "create from state in her session": ("POST", "/load_weights", {
            "session_id": session, "model_seq_id": 91, "path": a["paths"]["state"]}),
        "sampling session in her session": ("POST", "/create_sampling_session", {
            "session_id": session, "sampling_session_seq_id": 92, "base_model": BUILTIN_MODEL}),
    }


def _send(http: httpx.Client, method: str, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.request(method, path, content=body, headers={"Content-Type": "application/x-protobuf"})
    return http.request(method, path, json=body)


def test_to_another_user_nothing_of_alices_exists(tenancy_cluster, alices):
    answers = {}
    with tenancy_cluster.http_client(api_key=BOB) as http:
        for what, (method, path, body) in _cross_user_requests(alices).items():
            resp = _send(http, method, path, body)
            answers[what] = resp.status_code
            assert resp.status_code == 404 and resp.json()["detail"], (what, resp.status_code, resp.text)
        assert http.get("/training_runs").json()["training_runs"] == []
        assert http.get("/checkpoints").json()["checkpoints"] == []
        assert http.get("/sessions").json()["sessions"] == []
        # a request refused at the API spends its seq_id (SkipSeqReq), but only the caller's own
        tc = alices["tc"]
        next_seq = tc._request_id_counter + 1
        resp = _send(http, "POST", "/forward_backward", _fwdbwd_proto(tc.model_id, next_seq, loss_fn="nope"))
        assert resp.status_code == 400, resp.text
    print("bob's view of alice's things:", answers)

    # her work went on undisturbed: the seq_ids bob named are still hers to use, her session lives
    losses = train_steps(tc, sft_batch(tc.get_tokenizer(), WORDS[:2]), steps=1)
    assert np.isfinite(losses[0])
    with tenancy_cluster.http_client(api_key=ALICE) as http:
        assert http.post("/session_heartbeat", json={"session_id": alices["session_id"]}).status_code == 200


def test_the_sdk_sees_another_users_checkpoints_as_missing(clients, alices):
    with pytest.raises(tinker.NotFoundError):
        clients["bob"].create_training_client_from_state(alices["paths"]["state"]).result()
    with pytest.raises(tinker.NotFoundError):
        clients["bob"].create_sampling_client(model_path=alices["paths"]["sampler"]).result()


def test_a_users_keys_share_everything(tenancy_cluster, alices):
    rest = tenancy_cluster.rest_client(ALICE_LAPTOP)
    run = rest.get_training_run(alices["tc"].model_id).result()
    assert run.model_owner == "alice"
    listed = {c.tinker_path for c in rest.list_checkpoints(run.training_run_id).result().checkpoints}
    assert set(alices["paths"].values()) <= listed
    with tenancy_cluster.http_client(api_key=ALICE_LAPTOP) as http:
        assert http.post("/retrieve_future", json={"request_id": alices["request_id"]}).status_code == 200


def test_published_checkpoints_load_and_sample_for_everyone_but_stay_their_owners(tenancy_cluster, clients,
                                                                                 alices):
    alice_rest, bob_rest = tenancy_cluster.rest_client(ALICE), tenancy_cluster.rest_client(BOB)
    for path in (alices["paths"]["state"], alices["paths"]["sampler"]):
        alice_rest.publish_checkpoint_from_tinker_path(path).result()
    loaded = clients["bob"].create_training_client_from_state_with_optimizer(alices["paths"]["state"]).result()
    assert bob_rest.get_training_run(loaded.model_id).result().model_owner == "bob"
    sampler = clients["bob"].create_sampling_client(model_path=alices["paths"]["sampler"]).result()
    out = sampler.sample(prompt=alices["prompt"], num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=3, temperature=0.0)).result()
    assert len(out.sequences[0].tokens) >= 1
    assert bob_rest.get_weights_info_by_tinker_path(alices["paths"]["state"]).result().lora_rank == 8
    listed = bob_rest.list_user_checkpoints().result().checkpoints
    assert alices["paths"]["state"] not in {c.tinker_path for c in listed}
    for change in (lambda p: bob_rest.delete_checkpoint_from_tinker_path(p),
                   lambda p: bob_rest.unpublish_checkpoint_from_tinker_path(p),
                   lambda p: bob_rest.set_checkpoint_ttl_from_tinker_path(p, 3600)):
        with pytest.raises(tinker.PermissionDeniedError, match="only its owner"):
            change(alices["paths"]["state"]).result()
    alice_rest.unpublish_checkpoint_from_tinker_path(alices["paths"]["state"]).result()
    with pytest.raises(tinker.NotFoundError):
        clients["bob"].create_training_client_from_state(alices["paths"]["state"]).result()


def test_an_admin_sees_everything_and_hands_rows_between_users(tenancy_cluster, clients, alices):
    bobs = clients["bob"].create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()
    with tenancy_cluster.http_client(api_key=ROOT) as admin:
        owners = {r["training_run_id"]: r["model_owner"] for r in admin.get("/training_runs?limit=100").json()[
            "training_runs"]}
        assert owners[alices["tc"].model_id] == "alice" and owners[bobs.model_id] == "bob"
        assert admin.get(f"/training_runs/{alices['tc'].model_id}").status_code == 200
        assert admin.post("/retrieve_future", json={"request_id": alices["request_id"]}).status_code == 200
        with tenancy_cluster.http_client(api_key=BOB) as http:
            resp = http.post("/admin/reassign_user", json={"from_user": "alice", "to_user": "bob"})
            assert resp.status_code == 403 and "admin" in resp.json()["detail"]
        resp = admin.post("/admin/reassign_user", json={"from_user": "bob", "to_user": "carol"})
        assert resp.status_code == 200 and resp.json()["moved"]["training_runs"] >= 1
        assert admin.post("/admin/reassign_user", json={"from_user": "carol", "to_user": "legacy"}).status_code == 400
        admin.post("/admin/reassign_user", json={"from_user": "carol", "to_user": "bob"}).raise_for_status()
    assert tenancy_cluster.rest_client(BOB).get_training_run(bobs.model_id).result().model_owner == "bob"


def test_one_user_cannot_take_every_adapter_slot(tenancy_cluster, clients, alices):
    for _ in range(PER_USER - 1):  # alice's run from the fixture is the first
        clients["alice"].create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()
    # the limit is per user: a new session of hers, with her other key, is refused too
    with tenancy_cluster.http_client(api_key=ALICE_LAPTOP) as http:
        session_id = http.post("/create_session", json={}).json()["session_id"]
        for path, body in (("/create_model", {"base_model": BUILTIN_MODEL}),
                           ("/load_weights", {"path": alices["paths"]["state"]})):
            resp = http.post(path, json={"session_id": session_id, "model_seq_id": 0, **body})
            assert resp.status_code == 429, resp.text
            assert f"--max-adapters-per-user={PER_USER}" in resp.json()["detail"]
        # her finished session gives its runs' slots back
        clients["alice"].close("success").result()
        resp = http.post("/create_model", json={"session_id": session_id, "model_seq_id": 0,
                                                 "base_model": BUILTIN_MODEL})
        assert resp.status_code == 200, resp.text
        http.post(f"/sessions/{session_id}/finish", json={"reason": {"type": "success"}}).raise_for_status()
    # another user is not held back by alice's limit
    clients["bob"].create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()


def test_ownership_survives_a_restart(tmp_path, models_dir):
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS_FILE)
    args = ("--api-keys-file", str(keys))
    with launch_cluster(tmp_path / "state", models_dir, *args) as running:
        alice = running.service_client(ALICE)
        tc = alice.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4, seed=2).result()
        path = tc.save_state("kept").result().path
        alice.close("success").result()
    with launch_cluster(tmp_path / "state", models_dir, *args) as running:
        with running.http_client(api_key=BOB) as http:
            assert http.post("/weights_info", json={"tinker_path": path}).status_code == 404
            assert http.get("/checkpoints").json()["checkpoints"] == []
        alice = running.service_client(ALICE_LAPTOP)
        alice.create_training_client_from_state_with_optimizer(path).result()
        alice.close("success").result()
