"""Bad input gets a 4xx with a `detail`, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.e2e.conftest import BUILTIN_MODEL

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def http(cluster):
    with cluster.http_client(timeout_s=30) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(service_client):
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()
    return tc.model_id


def _assert_error(resp: httpx.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert detail
    for word in words:
        assert word in detail, detail


def _fwdbwd_proto(model_id: str, n_tokens: int, n_targets: int, n_weights: int) -> bytes:
    import numpy as np

    datum = pb.Datum()
    datum.model_input.add().encoded_text.tokens = np.arange(1, n_tokens + 1, dtype="<i4").tobytes()
    targets = datum.loss_fn_inputs["target_tokens"]
    targets.dtype, targets.dense = pb.DTYPE_INT64, np.ones(n_targets, "<i8").tobytes()
    targets.shape.append(n_targets)
    weights = datum.loss_fn_inputs["weights"]
    weights.dtype, weights.dense = pb.DTYPE_FLOAT32, np.ones(n_weights, "<f4").tobytes()
    weights.shape.append(n_weights)
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1, loss_fn="cross_entropy")
    req.data.append(datum)
    return req.SerializeToString()


def test_wrong_api_key_is_401(cluster):
    resp = httpx.post(cluster.base_url + "/api/v1/create_session", json={}, headers={"X-API-Key": "sk-nope"})
    _assert_error(resp, 401)
    resp = httpx.post(cluster.base_url + "/api/v1/create_session", json={})
    _assert_error(resp, 401)


def test_unknown_model_id_is_404(http):
    resp = http.post("/optim_step", json={"model_id": "nope:train:0", "seq_id": 1, "type": "optim_step",
                                          "adam_params": {"learning_rate": 1e-4}})
    _assert_error(resp, 404, "nope:train:0")
    _assert_error(http.post("/get_info", json={"model_id": "nope:train:0"}), 404)


def test_malformed_protobuf_is_400(http):
    resp = http.post("/forward_backward", content=b"\xff\xff\xffnot a protobuf",
                     headers={"Content-Type": "application/x-protobuf"})
    _assert_error(resp, 400)


def test_mismatched_target_and_weight_lengths_is_400(http, model_id):
    body = _fwdbwd_proto(model_id, n_tokens=6, n_targets=6, n_weights=5)
    resp = http.post("/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})
    _assert_error(resp, 400, "weights")


def test_targets_not_matching_input_length_is_400(http, model_id):
    body = _fwdbwd_proto(model_id, n_tokens=6, n_targets=4, n_weights=4)
    resp = http.post("/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})
    _assert_error(resp, 400, "target_tokens")


def test_unknown_loss_is_400_naming_the_valid_ones(http, model_id):
    req = pb.ForwardBackwardRequest.FromString(_fwdbwd_proto(model_id, 4, 4, 4))
    req.loss_fn = "no_such_loss"
    resp = http.post("/forward_backward", content=req.SerializeToString(),
                     headers={"Content-Type": "application/x-protobuf"})
    _assert_error(resp, 400, "no_such_loss", "cross_entropy")


def test_bad_lora_rank_and_base_model_are_400(http, service_client):
    session_id = service_client.holder.get_session_id()
    base = {"session_id": session_id, "model_seq_id": 99, "type": "create_model"}
    resp = http.post("/create_model", json={**base, "base_model": BUILTIN_MODEL, "lora_config": {"rank": 12}})
    _assert_error(resp, 400, "power of 2")
    resp = http.post("/create_model", json={**base, "base_model": "no/such-model", "lora_config": {"rank": 8}})
    _assert_error(resp, 400, "no/such-model")


def test_endpoints_tinkerd_does_not_serve_are_501_with_the_reason(http):
    _assert_error(http.post("/copy_weights", json={"source_path": "tinker://x/weights/y"}), 501, "no projects")
    _assert_error(http.post("/sessions/search", json={}), 501, "GET /api/v1/sessions")
    _assert_error(http.get("/auth/apikey/me"), 501, "--api-keys-file")
    _assert_error(http.post("/no_such_endpoint", json={}), 404, "no route")


def test_unknown_future_is_404(http):
    _assert_error(http.post("/retrieve_future", json={"request_id": "req-nope"}), 404)


def test_server_still_serves_after_bad_requests(http, service_client):
    assert http.get("/healthz").json()["status"] == "ok"
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    assert tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0


ESCAPING_NAMES = ["..", ".", "../../outside", "a/../../b", "/etc/x", "a/b", "..\\x", ".hidden", "x.tmp", "x.old",
                  "", "a" * 129, "sp ace", "nul\x00", "caf\u00e9"]


@pytest.mark.parametrize("endpoint", ["save_weights", "save_weights_for_sampler", "save_weights_external"])
def test_checkpoint_names_cannot_leave_their_directory(cluster, http, service_client, endpoint):
    tc = service_client.create_lora_training_client(base_model=BUILTIN_MODEL, rank=4).result()
    before = sorted(p for p in cluster.state_dir.rglob("*") if "logs" not in p.parts)
    seq_id = 1
    for name in ESCAPING_NAMES:
        resp = http.post(f"/{endpoint}", json={"model_id": tc.model_id, "seq_id": seq_id, "path": name})
        seq_id += 1
        _assert_error(resp, 400, "checkpoint name")
    after = sorted(p for p in cluster.state_dir.rglob("*") if "logs" not in p.parts)
    assert [p for p in after if p not in before and "tinkerd.sqlite3" not in p.name] == []
    # every refusal spent its seq_id: the next one is served
    resp = http.post(f"/{endpoint}", json={"model_id": tc.model_id, "seq_id": seq_id, "path": "fine-name.v1"})
    assert resp.status_code == 200, resp.text
    result = http.post("/retrieve_future", json={"request_id": resp.json()["request_id"]}).json()
    assert result["path"].endswith("/fine-name.v1"), result
