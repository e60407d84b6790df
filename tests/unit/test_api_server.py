"""The HTTP front-end over a real controller in this process.

The controller answers the API but its executor is not started and no workers are
attached, so nothing runs: submissions stay pending, and tests settle futures in the
controller's own FutureStore, exactly as its executors would.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import numpy as np
import pytest
import torch
import zmq.asyncio
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

import api.server
import cluster.sample_options
from actors.controller.controller import Controller
from api.server import connect_controller, start_http
from cluster.config import ApiConfig, ClusterConfig, ControllerConfig, ModelConfig
from cluster.messages import EngineSampleResp, ForwardBackwardResult, SampledSequence, SampleResult
from cluster.users import key_fingerprint_user

KEY = {"X-API-Key": "tml-unit"}


def make_config(tmp_path, **api) -> ClusterConfig:
    return ClusterConfig(
        state_dir=str(tmp_path),
        model=ModelConfig(name="test/model", tokenizer_dir="/models/tok", arch="qwen3", max_context=64,
                          vocab_size=100),
        api=ApiConfig(port=0, long_poll_s=0.2, **api),
        controller=ControllerConfig(api_address=f"ipc://{tmp_path}/api.sock",
                                    worker_address=f"ipc://{tmp_path}/workers.sock"))


@contextlib.asynccontextmanager
async def api_stack(config: ClusterConfig, with_controller: bool = True):
    """(http client, controller): the API process's server and, unless told not to, a controller."""
    controller = Controller(config) if with_controller else None
    if controller:
        controller.api.start(controller._on_api_message)  # answers requests; executes nothing
    ctx = zmq.asyncio.Context()
    peer = connect_controller(ctx, config)
    runner = await start_http(config, peer)
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
            yield http, controller
    finally:
        await runner.cleanup()
        peer.close()
        ctx.term()
        if controller:
            controller.api.close()
            controller.workers.peer.close()
            controller.store.close()
            controller.ctx.term()


async def expect_error(resp: aiohttp.ClientResponse, status: int, *words: str) -> str:
    assert resp.status == status, await resp.text()
    detail = (await resp.json())["detail"]
    for word in words:
        assert word in detail, detail
    return detail


def fwdbwd_body(model_id: str, seq_id: int = 1, loss_fn: str = "cross_entropy") -> bytes:
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn=loss_fn),
        model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(request).SerializeToString()


def test_auth_config_and_health(tmp_path):
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, controller):
            await expect_error(await http.post("/api/v1/create_session", json={}), 401, "X-API-Key")
            await expect_error(await http.post("/api/v1/create_session", json={},
                                               headers={"x-api-key": "sk-nope"}), 401)
            await expect_error(await http.get("/api/v1/healthz"), 503)  # no workers: not ready
            controller.workers.failure = "trainer 1 reports coordinates RankCoords(dp=0, tp=1, pp=0), but ..."
            # a failure is not "starting": the launcher stops waiting at once
            await expect_error(await http.get("/api/v1/healthz"), 500, "cluster failed: trainer 1 reports coordinates")
            controller.workers.failure = None
            config = await (await http.post("/api/v1/client/config", json={}, headers=KEY)).json()
            assert config == {"sample_use_retrieve_futures": True}
            dynamic = await (await http.post("/api/v1/client/dynamic_config", json={}, headers=KEY)).json()
            assert dynamic["sample_cancel_enabled"] is True
            telemetry = await http.post("/api/v1/telemetry", json={"events": []}, headers=KEY)
            assert await telemetry.json() == {"status": "accepted"}
            capabilities = await (await http.get("/api/v1/get_server_capabilities", headers=KEY)).json()
            assert capabilities == {"supported_models": [{"model_name": "test/model", "max_context_length": 64,
                                                          "trainable": True, "sampleable": True}]}
            await expect_error(await http.post("/api/v1/no_such_route", headers=KEY), 404, "no_such_route")
            await expect_error(await http.get("/api/v1/create_session", headers=KEY), 405)
            await expect_error(await http.post("/api/v1/create_session", data=b"{oops", headers=KEY), 400, "JSON")

    asyncio.run(scenario())


def test_healthz_waits_for_the_cluster_to_start_when_asked(tmp_path):
    """`?wait_s=S`: a starting cluster is answered after S seconds at most, and at once when it starts or fails."""
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, controller):
            loop = asyncio.get_running_loop()
            started = loop.time()
            await expect_error(await http.get("/api/v1/healthz?wait_s=1"), 503)  # nobody came
            assert 0.9 < loop.time() - started < 3
            await expect_error(await http.get("/api/v1/healthz?wait_s=99"), 400, "wait_s")
            loop.call_later(0.2, controller.workers._fail, "engine 0 failed: no model")
            started = loop.time()
            await expect_error(await http.get("/api/v1/healthz?wait_s=20"), 500, "engine 0 failed: no model")
            assert loop.time() - started < 5

    asyncio.run(scenario())


def test_listed_keys_only_and_each_sees_only_its_users_sessions(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("tml-alice-1 alice\ntml-alice-2 alice  # her laptop\ntml-bob bob\ntml-root root admin\n")
    alice, alice_laptop, bob, root = ({"X-API-KEY": k} for k in ("tml-alice-1", "tml-alice-2", "tml-bob", "tml-root"))

    async def scenario():
        async with api_stack(make_config(tmp_path, api_keys_file=str(keys))) as (http, _):
            await expect_error(await http.post("/api/v1/client/config", json={}, headers=KEY), 401, "invalid")
            assert (await http.post("/api/v1/client/config", json={}, headers=alice)).status == 200
            session_id = (await (await http.post("/api/v1/create_session", json={}, headers=alice)).json())[
                "session_id"]
            beat = {"session_id": session_id, "type": "session_heartbeat"}
            assert (await http.post("/api/v1/session_heartbeat", json=beat, headers=alice_laptop)).status == 200
            await expect_error(await http.post("/api/v1/session_heartbeat", json=beat, headers=bob), 404,
                               session_id)
            assert (await http.post("/api/v1/session_heartbeat", json=beat, headers=root)).status == 200
            assert (await (await http.get("/api/v1/sessions", headers=bob)).json())["sessions"] == []
            assert (await (await http.get("/api/v1/sessions", headers=root)).json())["sessions"] == [session_id]

    asyncio.run(scenario())


def test_controller_silence_is_503(tmp_path, monkeypatch):
    monkeypatch.setattr(api.server, "HEALTH_TIMEOUT_S", 0.3)

    async def scenario():
        async with api_stack(make_config(tmp_path), with_controller=False) as (http, _):
            await expect_error(await http.get("/api/v1/healthz"), 503, "ClusterStatusReq")

    asyncio.run(scenario())


def test_sessions_models_and_futures(tmp_path):
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, controller):
            session_id = (await (await http.post("/api/v1/create_session", json={"tags": []}, headers=KEY)).json())[
                "session_id"]
            heartbeat = await http.post("/api/v1/session_heartbeat", json={"session_id": session_id}, headers=KEY)
            assert await heartbeat.json() == {}
            create = {"session_id": session_id, "model_seq_id": 0, "base_model": "test/model", "type": "create_model"}
            await expect_error(await http.post("/api/v1/create_model", headers=KEY,
                                               json={**create, "lora_config": {"rank": 12}}), 400, "power of 2")
            submitted = await (await http.post("/api/v1/create_model", headers=KEY,
                                               json={**create, "lora_config": {"rank": 4}})).json()
            model_id = f"{session_id}:train:0"
            assert submitted["model_id"] == model_id
            poll = await http.post("/api/v1/retrieve_future", json={"request_id": submitted["request_id"]},
                                   headers=KEY)
            assert await poll.json() == {"type": "try_again", "request_id": submitted["request_id"],
                                         "queue_state": "active"}
            info = await (await http.post("/api/v1/get_info", json={"model_id": model_id}, headers=KEY)).json()
            assert info == {"model_id": model_id, "is_lora": True, "lora_rank": 4, "model_name": "test/model",
                            "model_data": {"arch": "qwen3", "model_name": "test/model", "tokenizer_id": "/models/tok"}}
            await expect_error(await http.post("/api/v1/optim_step", headers=KEY, json={
                "model_id": "nope:train:0", "seq_id": 1, "adam_params": {}}), 404, "nope:train:0")
            await expect_error(await http.post("/api/v1/retrieve_future", json={"request_id": "req-nope"},
                                               headers=KEY), 404, "req-nope")
            await http.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "success"}},
                            headers=KEY)
            await expect_error(await http.post("/api/v1/session_heartbeat", json={"session_id": session_id},
                                               headers=KEY), 410)

    asyncio.run(scenario())


def test_forward_backward_submission_and_proto_result(tmp_path):
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, controller):
            session_id = (await (await http.post("/api/v1/create_session", json={}, headers=KEY)).json())["session_id"]
            await http.post("/api/v1/create_model", headers=KEY, json={
                "session_id": session_id, "model_seq_id": 0, "base_model": "test/model"})
            model_id = f"{session_id}:train:0"
            proto_headers = {**KEY, "Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
            body = zstandard.ZstdCompressor().compress(fwdbwd_body(model_id))
            submitted = await (await http.post("/api/v1/forward_backward", data=body, headers=proto_headers)).json()
            assert submitted["model_id"] == model_id
            await expect_error(await http.post("/api/v1/forward_backward", data=b"\xff\xffjunk",
                                               headers={**KEY, "Content-Type": "application/x-protobuf"}), 400)
            await expect_error(await http.post("/api/v1/forward_backward", data=b"x",
                                               headers={**KEY, "Content-Type": "text/plain"}), 415)

            logprobs = np.array([-1.0, -2.0, -3.0], np.float32)
            controller.futures.resolve(submitted["request_id"], ForwardBackwardResult(
                lengths=np.array([3]), logprobs=logprobs, elementwise_loss=-logprobs, metrics={"loss:sum": 6.0}))
            poll = {"request_id": submitted["request_id"], "allow_metadata_only": True}
            resp = await http.post("/api/v1/retrieve_future", json=poll,
                                   headers={**KEY, "Accept": "application/x-protobuf"})
            assert resp.content_type == "application/x-protobuf"
            output = deserialize_forward_backward_output(await resp.read())
            assert output.metrics == {"loss:sum": 6.0}
            assert output.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0, -3.0]
            as_json = await (await http.post("/api/v1/retrieve_future", json=poll, headers=KEY)).json()
            assert as_json["loss_fn_outputs"][0]["logprobs"]["data"] == [-1.0, -2.0, -3.0]

    asyncio.run(scenario())


def test_sampling_sessions_samples_and_failed_futures(tmp_path):
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, controller):
            session_id = (await (await http.post("/api/v1/create_session", json={}, headers=KEY)).json())["session_id"]
            created = await (await http.post("/api/v1/create_sampling_session", headers=KEY, json={
                "session_id": session_id, "sampling_session_seq_id": 0, "base_model": "test/model"})).json()
            sampler_id = created["sampling_session_id"]
            sampler = await (await http.get(f"/api/v1/samplers/{sampler_id}", headers=KEY)).json()
            assert sampler == {"sampler_id": sampler_id, "base_model": "test/model"}
            sample = {"sampling_session_id": sampler_id, "seq_id": 0, "num_samples": 2, "type": "sample",
                      "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                      "sampling_params": {"max_tokens": 4}, "prompt_logprobs": True}
            submitted = await (await http.post("/api/v1/asample", json=sample, headers=KEY)).json()
            assert len(submitted["sample_sequence_ids"]) == 2
            await expect_error(await http.post("/api/v1/asample", headers=KEY, json={
                **sample, "sampling_params": {"max_tokens": 62}}), 400, "3 + 62 > 64")

            user = key_fingerprint_user(KEY["X-API-Key"])
            done, failed = controller.futures.create("sample", user), controller.futures.create("sample", user)
            controller.futures.resolve(done, SampleResult(
                sequences=[SampledSequence(tokens=np.array([5], np.int32), logprobs=np.array([-0.5], np.float32),
                                           stop_reason="stop")] * 2,
                prompt_logprobs=np.array([np.nan, -1.0, -2.0], np.float32)))
            controller.futures.fail(failed, "engine exploded", "server")
            proto_accept = {**KEY, "Accept": "application/x-protobuf"}
            resp = await http.post("/api/v1/retrieve_future", json={"request_id": done}, headers=proto_accept)
            result = deserialize_sample_response(await resp.read())
            assert result.prompt_logprobs == [None, -1.0, -2.0] and result.sequences[1].tokens == [5]
            resp = await http.post("/api/v1/retrieve_future", json={"request_id": failed}, headers=proto_accept)
            assert await resp.json() == {"error": "engine exploded", "category": "server"}

    asyncio.run(scenario())


@pytest.mark.parametrize("reason", ["success", "interrupted"])
def test_finish_unknown_session_is_404(tmp_path, reason):
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, _):
            await expect_error(await http.post("/api/v1/sessions/nope/finish", headers=KEY,
                                               json={"reason": {"type": reason}, "detail": None}), 404, "nope")

    asyncio.run(scenario())


async def _model_with_refused_seq_1(http) -> str:
    """A model whose seq_id 1 was refused by the API (unknown loss) and seq_id 2 then submitted."""
    session_id = (await (await http.post("/api/v1/create_session", json={}, headers=KEY)).json())["session_id"]
    await http.post("/api/v1/create_model", headers=KEY, json={
        "session_id": session_id, "model_seq_id": 0, "base_model": "test/model"})
    model_id = f"{session_id}:train:0"
    proto_headers = {**KEY, "Content-Type": "application/x-protobuf"}
    await expect_error(await http.post("/api/v1/forward_backward", headers=proto_headers,
                                       data=fwdbwd_body(model_id, seq_id=1, loss_fn="no_such_loss")),
                       400, "no_such_loss")
    second = await http.post("/api/v1/forward_backward", headers=proto_headers, data=fwdbwd_body(model_id, 2))
    assert second.status == 200, await second.text()
    return model_id


def test_refused_request_is_still_a_400_with_its_own_detail(tmp_path):
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, _):
            await _model_with_refused_seq_1(http)

    asyncio.run(scenario())


def test_refused_seq_id_does_not_hold_back_the_next(tmp_path):
    # the SDK never resends a refused seq_id, so the ledger must move past it
    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, controller):
            model_id = await _model_with_refused_seq_1(http)
            assert controller.training.runs[model_id].ledger.next_seq == 3

    asyncio.run(scenario())


# -- SDK 0.38 sampling options ----------------------------------------------------------


async def _sampler(http) -> str:
    session_id = (await (await http.post("/api/v1/create_session", json={}, headers=KEY)).json())["session_id"]
    created = await (await http.post("/api/v1/create_sampling_session", headers=KEY, json={
        "session_id": session_id, "sampling_session_seq_id": 0, "base_model": "test/model"})).json()
    return created["sampling_session_id"]


def _sample_body(sampler_id: str, prompt: list[int], seq_id: int = 0, **options) -> dict:
    return {"sampling_session_id": sampler_id, "seq_id": seq_id, "num_samples": 1, "type": "sample",
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "sampling_params": {"max_tokens": 2}, **options}


def _tensor_json(td: types.TensorData) -> dict:
    body = {"data": td.data, "dtype": td.dtype, "shape": td.shape}
    if td.sparse_crow_indices is not None:
        body.update(sparse_crow_indices=td.sparse_crow_indices, sparse_col_indices=td.sparse_col_indices)
    return body


async def _echo_engine(request_id, req):
    """Answers like an engine would, with logprobs made from the ids, so the test can predict them."""
    n, ids = len(req.prompt_tokens), req.target_prompt_token_ids
    sequence = SampledSequence(tokens=np.array([7, 8], np.int32), logprobs=np.array([-0.5, -0.25], np.float32),
                               topk_token_ids=np.array([[7, 3], [8, 3]], np.int32),
                               topk_logprobs=np.array([[-0.5, -2.0], [-0.25, -3.0]], np.float32))
    alt_ids = np.arange(2 * (n - 1), dtype=np.int64).reshape(n - 1, 2)
    return EngineSampleResp(result=SampleResult(
        sequences=[sequence], target_prompt_logprobs=np.where(ids != -1, -ids / 100, 0).astype(np.float32),
        target_prompt_listed=req.target_prompt_listed, prompt_alt_token_ids=alt_ids,
        prompt_alt_logprobs=-alt_ids.astype(np.float32)))


async def _sample_result(http, body: dict):
    submitted = await http.post("/api/v1/asample", json=body, headers=KEY)
    assert submitted.status == 200, await submitted.text()
    poll = {"request_id": (await submitted.json())["request_id"]}
    proto_accept = {**KEY, "Accept": "application/x-protobuf"}
    while True:
        resp = await http.post("/api/v1/retrieve_future", json=poll, headers=proto_accept)
        if resp.content_type == "application/x-protobuf":
            as_json = await (await http.post("/api/v1/retrieve_future", json=poll, headers=KEY)).json()
            return deserialize_sample_response(await resp.read()), as_json
        assert (await resp.json())["type"] == "try_again"


def test_target_prompt_logprobs_come_back_in_the_requests_layout(tmp_path, monkeypatch):
    ids = torch.full((5, 3), -1, dtype=torch.int64)
    ids[3, 1], ids[4, 0], ids[4, 2] = 40, 7, 99
    sparse = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    dense = types.TensorData.from_torch(ids)
    assert sparse.sparse_crow_indices is not None and dense.sparse_crow_indices is None
    expected = np.where(ids.numpy() != -1, -ids.numpy() / 100, 0).astype(np.float32)

    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, controller):
            monkeypatch.setattr(controller.sampling, "_on_engine", _echo_engine)
            sampler_id = await _sampler(http)
            for seq_id, target in enumerate([sparse, dense]):
                body = _sample_body(sampler_id, [1, 2, 3, 4, 5, 6], seq_id, target_prompt_logprobs=_tensor_json(target),
                                    topk_sample_logprobs=2, prompt_alt_tokens_k=2)
                result, as_json = await _sample_result(http, body)
                out = result.target_prompt_logprobs
                assert out.dtype == "float32" and out.shape == [5, 3]
                assert out.sparse_crow_indices == target.sparse_crow_indices
                assert out.sparse_col_indices == target.sparse_col_indices
                np.testing.assert_array_equal(out.to_numpy(), expected)
                assert as_json["target_prompt_logprobs"].get("sparse_col_indices") == target.sparse_col_indices
                assert result.sequences[0].topk_logprobs == [[(7, -0.5), (3, -2.0)], [(8, -0.25), (3, -3.0)]]
                assert as_json["sequences"][0]["topk_logprobs"] == [[[7, -0.5], [3, -2.0]], [[8, -0.25], [3, -3.0]]]
                alt = result.prompt_alt_tokens
                assert alt.tokens.dtype == "int64" and alt.tokens.shape == [5, 2]
                assert alt.tokens.to_numpy().tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
                np.testing.assert_array_equal(alt.logprobs.to_numpy(), -alt.tokens.to_numpy())
                assert as_json["prompt_alt_tokens"]["tokens"]["data"] == list(range(10))

    asyncio.run(scenario())


def test_invalid_sample_options_are_400s_naming_the_field(tmp_path, monkeypatch):
    prompt = [1, 2, 3, 4]
    ids = {"data": [5, -1, 6], "dtype": "int64", "shape": [3, 1]}
    csr = {"dtype": "int64", "shape": [3, 2], "data": [5, 6], "sparse_crow_indices": [0, 0, 2, 2]}
    bad = [
        ({"topk_sample_logprobs": -1}, ["topk_sample_logprobs", "[0, 100]"]),
        ({"topk_sample_logprobs": 101}, ["topk_sample_logprobs", "[0, 100]"]),
        ({"prompt_logprobs_last_n": 2}, ["prompt_logprobs_last_n", "requires prompt_logprobs"]),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 0}, ["prompt_logprobs_last_n", "[1, 3]"]),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 4}, ["prompt_logprobs_last_n", "[1, 3]"]),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": "2"}, ["prompt_logprobs_last_n", "integer"]),
        ({"target_prompt_logprobs": {**ids, "dtype": "float32"}}, ["target_prompt_logprobs", "int64"]),
        ({"target_prompt_logprobs": {**ids, "shape": [3]}}, ["target_prompt_logprobs", "2-D"]),
        ({"target_prompt_logprobs": {**ids, "data": [5, 6], "shape": [2, 1]}}, ["target_prompt_logprobs", "3 rows"]),
        ({"target_prompt_logprobs": {**ids, "data": [-1, -1, -1]}}, ["target_prompt_logprobs", "no token id"]),
        ({"target_prompt_logprobs": {**ids, "data": [5, 100, 6]}}, ["target_prompt_logprobs", "[0, 100)"]),
        ({"target_prompt_logprobs": {**ids, "data": [5, -2, 6]}}, ["target_prompt_logprobs", "-1 or in"]),
        ({"target_prompt_logprobs": {**csr, "sparse_col_indices": [1, 0]}}, ["target_prompt_logprobs", "strictly"]),
        ({"target_prompt_logprobs": {**csr, "sparse_col_indices": [1, 1]}}, ["target_prompt_logprobs", "strictly"]),
        ({"target_prompt_logprobs": {**csr, "sparse_col_indices": [0, 2]}}, ["target_prompt_logprobs", "col_indices"]),
        ({"target_prompt_logprobs": [5, 6, 7]}, ["target_prompt_logprobs", "object"]),
        ({"prompt_alt_tokens_k": -1}, ["prompt_alt_tokens_k", ">= 0"]),
        ({"prompt_alt_tokens_k": (1 << 18) + 1}, ["prompt_alt_tokens_k", "4 × 262145 > 1048576"]),
    ]
    fine = {"prompt_logprobs": True, "prompt_logprobs_last_n": 3, "target_prompt_logprobs": ids,
            "prompt_alt_tokens_k": 2, "topk_sample_logprobs": 100}

    async def scenario():
        async with api_stack(make_config(tmp_path)) as (http, _):
            sampler_id = await _sampler(http)
            for options, words in bad:
                await expect_error(await http.post("/api/v1/asample", headers=KEY,
                                                   json=_sample_body(sampler_id, prompt, **options)), 400, *words)
            resp = await http.post("/api/v1/asample", headers=KEY, json=_sample_body(sampler_id, prompt, **fine))
            assert resp.status == 200, await resp.text()
            # the test model's vocabulary cannot reach the cell bound of target ids: lower it
            monkeypatch.setattr(cluster.sample_options, "MAX_PROMPT_SCORE_CELLS", 4 * 2 - 1)
            await expect_error(await http.post("/api/v1/asample", headers=KEY, json=_sample_body(
                sampler_id, prompt, seq_id=1, target_prompt_logprobs=ids)), 400,
                "target_prompt_logprobs", "len(prompt) × distinct ids = 4 × 2 > 7")

    asyncio.run(scenario())
