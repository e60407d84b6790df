"""HTTP bodies <-> messages, proven against the SDK's own encoders and decoders.

Requests are built by the SDK's code (`request_conv`, `model_dump`), results are
parsed back with the functions the SDK runs on a `retrieve_future` answer.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import orjson
import pytest
import zstandard
from tinker import types
from tinker._compat import model_dump
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from api.errors import HttpError
from api.forward_backward import (
    decompress_body, forward_backward_from_json, forward_backward_from_proto, forward_backward_output_json,
    forward_backward_output_proto, parse_forward_backward_proto,
)
from api.json_fields import JsonObject, parse_json_object
from api.json_requests import (
    create_model_from_json, load_weights_from_json, optim_step_from_json, save_weights_for_sampler_from_json,
    save_weights_from_json,
)
from api.sampling import DEFAULT_MAX_TOKENS, sample_request_from_json, sample_response_json, sample_response_proto
from cluster.config import ModelConfig
from cluster.messages import (
    AdamParams, DatumProvenance, ForwardBackwardReq, ForwardBackwardResult, ProvenanceSpan, SampledSequence,
    SampleResult,
)

MODEL = ModelConfig(name="test/model", max_context=64, vocab_size=100)
MODEL_ID = "sess:train:0"


def sdk_fwdbwd_body(data, loss_fn="cross_entropy", config=None, forward_only=False) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id=MODEL_ID, seq_id=4)
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only  # as the SDK's training resource sets it
    return msg.SerializeToString()


def decode_proto(body: bytes, model: ModelConfig) -> ForwardBackwardReq:
    return forward_backward_from_proto(parse_forward_backward_proto(body), model)


def datum(tokens, targets, **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={"target_tokens": targets, **inputs})


def http_error(fn, *args) -> HttpError:
    with pytest.raises(HttpError) as info:
        fn(*args)
    assert info.value.detail
    return info.value


# -- forward_backward requests -----------------------------------------------------------


def test_sdk_request_decodes_into_a_flat_batch():
    body = sdk_fwdbwd_body([datum([1, 2, 3], [2, 3, 4], weights=[0.0, 1.0, 1.0]),
                            datum([5, 6], [6, 7], weights=[-0.5, 2.0])], forward_only=True)
    req = decode_proto(body, MODEL)
    assert (req.model_id, req.seq_id, req.loss_fn, req.forward_only) == (MODEL_ID, 4, "cross_entropy", True)
    assert req.batch.tokens.dtype == np.int64 and req.batch.tokens.tolist() == [1, 2, 3, 5, 6]
    assert req.batch.lengths.tolist() == [3, 2]
    assert req.batch.loss_inputs["target_tokens"].tolist() == [2, 3, 4, 6, 7]
    assert req.batch.loss_inputs["weights"].dtype == np.float32
    assert req.batch.loss_inputs["weights"].tolist() == [0.0, 1.0, 1.0, -0.5, 2.0]


def test_sparse_csr_inputs_are_densified():
    targets = np.array([[3, 0], [0, 0], [5, 9], [0, 0]], dtype=np.int64)
    weights = np.array([[1, 0], [0, 0], [0.5, 0.25], [0, 0]], dtype=np.float32)
    csr_targets = types.TensorData(data=[3, 5, 9], dtype="int64", shape=[4, 2],
                                   sparse_crow_indices=[0, 1, 1, 3, 3], sparse_col_indices=[0, 0, 1])
    csr_weights = types.TensorData(data=[1.0, 0.5, 0.25], dtype="float32", shape=[4, 2],
                                   sparse_crow_indices=[0, 1, 1, 3, 3], sparse_col_indices=[0, 0, 1])
    body = sdk_fwdbwd_body([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                                        loss_fn_inputs={"target_tokens": csr_targets, "weights": csr_weights})])
    batch = decode_proto(body, MODEL).batch
    np.testing.assert_array_equal(batch.loss_inputs["target_tokens"], targets)
    np.testing.assert_array_equal(batch.loss_inputs["weights"], weights)


def test_sdk_auto_sparsified_torch_targets():
    torch = pytest.importorskip("torch")
    targets = torch.zeros((6, 4), dtype=torch.int64)
    targets[1, 2], targets[4, 0] = 7, 8
    sdk_datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(6))),
                            loss_fn_inputs={"target_tokens": targets, "weights": (targets > 0).float()})
    assert sdk_datum.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None  # the SDK chose CSR
    batch = decode_proto(sdk_fwdbwd_body([sdk_datum]), MODEL).batch
    np.testing.assert_array_equal(batch.loss_inputs["target_tokens"], targets.numpy())
    np.testing.assert_array_equal(batch.loss_inputs["weights"], (targets > 0).float().numpy())


def test_zstd_bodies_with_and_without_content_size():
    body = sdk_fwdbwd_body([datum([1, 2], [2, 3])])
    framed = zstandard.ZstdCompressor().compress(body)  # what the SDK sends
    assert decompress_body(framed, "zstd") == body
    stream = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(stream, closefd=False) as writer:
        writer.write(body)
    assert decompress_body(stream.getvalue(), "ZSTD") == body
    assert decompress_body(body, "") == body
    assert http_error(decompress_body, b"not zstd", "zstd").status == 400
    assert http_error(decompress_body, body, "br").status == 415


def test_missing_weights_default_to_ones():
    batch = decode_proto(sdk_fwdbwd_body([datum([1, 2, 3], [2, 3, 4])]), MODEL).batch
    assert batch.loss_inputs["weights"].tolist() == [1.0, 1.0, 1.0]


def test_v2_loss_config_is_preferred_and_carries_text():
    data = [datum([1, 2], [2, 3], logprobs=[-1.0, -2.0], advantages=[1.0, 0.5])]
    req = decode_proto(sdk_fwdbwd_body(data, "ppo", {"clip_low_threshold": 0.7, "tag": "x"}), MODEL)
    assert req.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7), "tag": "x"}


@pytest.mark.parametrize("data, loss_fn, words", [
    ([datum([1, 2, 3], [2, 3, 4], weights=[1.0, 1.0])], "cross_entropy", ["data[0]", "weights", "[2]", "[3]"]),
    ([datum([1, 2, 3], [2, 3])], "cross_entropy", ["data[0]", "target_tokens", "[3]"]),
    ([datum([1, 2], [2, 3])], "no_such_loss", ["no_such_loss", "cross_entropy", "ppo"]),
    ([datum([1, 2], [2, 3], advantages=[0.0, 1.0])], "stable_reinforce",
     ["data[0]", "no provenance spans", "record_stability_info"]),
    ([datum([1, 2], [2, 3])], "importance_sampling", ["data[0]", "logprobs", "importance_sampling"]),
    ([datum([1, 2], [2, 3], weight=np.ones(2, np.float32))], "cross_entropy", ["data[0]", "weight", "takes"]),
    ([datum([1, 2], [2, 3]), datum([1, 500], [2, 3])], "cross_entropy", ["data[1].model_input", "500", "100"]),
    ([datum([1, 2], [2, 100])], "cross_entropy", ["data[0]", "target_tokens", "100"]),
    ([datum([1, 2], np.array([2.5, 3.5], np.float32))], "cross_entropy", ["target_tokens", "integer"]),
    ([datum(list(range(65)), list(range(65)))], "cross_entropy", ["data[0]", "65", "64"]),
    ([datum([1, 2], [2, 3]), datum([1, 2], [[2, 3], [3, 4]])], "cross_entropy", ["data[1]", "trailing"]),
    ([], "cross_entropy", ["data", "empty"]),
])
def test_invalid_requests_are_400_naming_the_problem(data, loss_fn, words):
    error = http_error(decode_proto, sdk_fwdbwd_body(data, loss_fn), MODEL)
    assert error.status == 400
    for word in words:
        assert word in error.detail, error.detail


def _with_spans(d: types.Datum, model_input, targets) -> types.Datum:
    """Spans as the wire carries them, even ones `Datum.with_provenance` would refuse client-side."""
    return dataclasses.replace(d, model_input_spans=model_input, loss_fn_input_spans=targets)


def test_provenance_spans_decode_for_stable_reinforce_and_are_dropped_for_other_losses():
    spans = ([types.PromptProvenanceSpan(sequence_id="s:0:0", length=2),
              types.SampledProvenanceSpan(sequence_id="s:0:0", length=1)],
             [types.PromptProvenanceSpan(sequence_id="s:0:0", offset=1, length=1),
              types.SampledProvenanceSpan(sequence_id="s:0:0", length=2)])
    d = datum([1, 2, 3], [0, 3, 4], advantages=[0.0, 1.0, 1.0]).with_provenance(*spans)
    req = decode_proto(sdk_fwdbwd_body([d], "stable_reinforce"), MODEL)
    assert req.provenance == [DatumProvenance(
        model_input=[ProvenanceSpan(sequence_id="s:0:0", sampled=False, offset=0, length=2),
                     ProvenanceSpan(sequence_id="s:0:0", sampled=True, offset=0, length=1)],
        targets=[ProvenanceSpan(sequence_id="s:0:0", sampled=False, offset=1, length=1),
                 ProvenanceSpan(sequence_id="s:0:0", sampled=True, offset=0, length=2)])]
    assert req.batch.loss_inputs["logprobs"].tolist() == [0.0, 0.0, 0.0]  # the server's records fill it
    d = datum([1, 2, 3], [0, 3, 4], logprobs=[0.0, -1.0, -1.0], advantages=[0.0, 1.0, 1.0])
    assert decode_proto(sdk_fwdbwd_body([d.with_provenance(*spans)], "importance_sampling"), MODEL).provenance is None


@pytest.mark.parametrize("model_input, targets, words", [
    ([types.PromptProvenanceSpan(sequence_id="s:0:0", length=2)],
     [types.SampledProvenanceSpan(sequence_id="s:0:0", length=3)], ["data[0].model_input_spans", "cover 2", "3"]),
    ([types.PromptProvenanceSpan(sequence_id="s:0:0", length=3)],
     [types.SampledProvenanceSpan(sequence_id="s:0:0", length=2)], ["data[0].loss_fn_input_spans", "tile"]),
])
def test_spans_must_tile_their_fields(model_input, targets, words):
    d = _with_spans(datum([1, 2, 3], [2, 3, 4], advantages=[1.0, 1.0, 1.0]), model_input, targets)
    error = http_error(decode_proto, sdk_fwdbwd_body([d], "stable_reinforce"), MODEL)
    for word in words:
        assert word in error.detail, error.detail


def test_image_chunk_is_400():
    image = types.ImageChunk(data=b"\x89PNG....", format="png", expected_tokens=4)
    model_input = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]), image])
    data = [types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": [1] * 6})]
    error = http_error(decode_proto, sdk_fwdbwd_body(data), MODEL)
    assert error.status == 400 and "data[0].model_input[1]" in error.detail and "image" in error.detail


def test_malformed_protobuf_is_400():
    assert http_error(parse_forward_backward_proto, b"\xff\xff\xffnot a protobuf").status == 400


def test_unknown_vocab_skips_the_range_check():
    batch = decode_proto(sdk_fwdbwd_body([datum([1, 5000], [5000, 7])]),
                                        ModelConfig(max_context=64)).batch
    assert batch.tokens.tolist() == [1, 5000]


def _json_datum(tokens, targets, weights, chunk_type=True):
    chunk = {"tokens": tokens, **({"type": "encoded_text"} if chunk_type else {})}
    return {"model_input": {"chunks": [chunk]},
            "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]},
                               "weights": {"data": weights, "dtype": "float32"}}}


def test_json_bodies_of_old_sdks_decode_like_the_protobuf():
    expected = decode_proto(sdk_fwdbwd_body([datum([1, 2, 3], [2, 3, 4], weights=[0.0, 1.0, 1.0])]),
                                           MODEL)
    flat = {"model_id": MODEL_ID, "seq_id": 4, "loss_fn": "cross_entropy", "loss_fn_config": None,
            "data": [_json_datum([1, 2, 3], [2, 3, 4], [0.0, 1.0, 1.0])]}
    nested = {"model_id": MODEL_ID, "seq_id": 4, "forward_backward_input": {
        "loss_fn": "cross_entropy", "data": [_json_datum([1, 2, 3], [2, 3, 4], [0.0, 1.0, 1.0], chunk_type=False)]}}
    for body in (flat, nested):
        req = forward_backward_from_json(parse_json_object(orjson.dumps(body)), MODEL)
        assert (req.model_id, req.seq_id, req.loss_fn) == (MODEL_ID, 4, "cross_entropy")
        for name in ("target_tokens", "weights"):
            np.testing.assert_array_equal(req.batch.loss_inputs[name], expected.batch.loss_inputs[name])
        np.testing.assert_array_equal(req.batch.tokens, expected.batch.tokens)


def test_json_csr_tensor_and_json_errors():
    body = {"model_id": MODEL_ID, "seq_id": 1, "loss_fn": "cross_entropy", "data": [{
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "loss_fn_inputs": {"target_tokens": {"data": [4], "dtype": "int64", "shape": [2, 2],
                                             "sparse_crow_indices": [0, 0, 1], "sparse_col_indices": [1]}}}]}
    req = forward_backward_from_json(JsonObject(body, ""), MODEL)
    assert req.batch.loss_inputs["target_tokens"].tolist() == [[0, 0], [0, 4]]
    body["data"][0]["model_input"]["chunks"][0] = {"type": "image", "data": "AAAA", "format": "png"}
    assert "image" in http_error(forward_backward_from_json, JsonObject(body, ""), MODEL).detail
    assert http_error(parse_json_object, b"{not json").status == 400


# -- forward_backward results --------------------------------------------------------------


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_fwdbwd_result_proto_is_what_the_sdk_parses(trailing):
    lengths = np.array([2, 3], dtype=np.int64)
    logprobs = -np.arange(5 * int(np.prod(trailing)), dtype=np.float32).reshape(5, *trailing)
    result = ForwardBackwardResult(lengths=lengths, logprobs=logprobs, elementwise_loss=-logprobs,
                                   metrics={"loss:sum": 12.5})
    output = deserialize_forward_backward_output(forward_backward_output_proto(result))
    assert output.loss_fn_output_type == "ArrayRecord"
    assert output.metrics == {"loss:sum": 12.5}
    assert len(output.loss_fn_outputs) == 2
    for i, (lo, hi) in enumerate([(0, 2), (2, 5)]):
        got = output.loss_fn_outputs[i]
        assert got["logprobs"].dtype == "float32" and got["logprobs"].shape == [hi - lo, *trailing]
        np.testing.assert_array_equal(got["logprobs"].to_numpy(), logprobs[lo:hi])
        np.testing.assert_array_equal(got["elementwise_loss"].to_numpy(), -logprobs[lo:hi])


def test_fwdbwd_result_json_for_old_sdks():
    result = ForwardBackwardResult(lengths=np.array([1, 2]), logprobs=np.array([-1.0, -2.0, -3.0], np.float32),
                                   elementwise_loss=np.array([1.0, 2.0, 3.0], np.float32), metrics={"loss:sum": 6.0})
    body = orjson.loads(orjson.dumps(forward_backward_output_json(result)))
    assert body["loss_fn_output_type"] == "ArrayRecord" and body["metrics"] == {"loss:sum": 6.0}
    assert body["loss_fn_outputs"][1]["logprobs"] == {"data": [-2.0, -3.0], "dtype": "float32", "shape": [2]}
    assert types.TensorData(**body["loss_fn_outputs"][0]["elementwise_loss"]).tolist() == [1.0]


# -- sampling --------------------------------------------------------------------------------


def _sample_result(with_prompt_logprobs=True):
    sentinel = (0, -99999.0)
    ids = np.array([[sentinel[0]] * 2, [5, 6], [7, sentinel[0]]], dtype=np.int32)
    lps = np.array([[sentinel[1]] * 2, [-0.1, -2.0], [-0.3, sentinel[1]]], dtype=np.float32)
    return SampleResult(
        sequences=[SampledSequence(tokens=np.array([4, 5], np.int32), logprobs=np.array([-0.5, -1.5], np.float32),
                                   stop_reason="stop"),
                   SampledSequence(tokens=np.array([9, 9, 9], np.int32), logprobs=np.zeros(3, np.float32))],
        prompt_logprobs=np.array([np.nan, -1.25, -0.75], np.float32) if with_prompt_logprobs else None,
        topk_prompt_token_ids=ids if with_prompt_logprobs else None,
        topk_prompt_logprobs=lps if with_prompt_logprobs else None)


def test_sample_result_proto_is_what_the_sdk_parses():
    response = deserialize_sample_response(sample_response_proto(_sample_result()))
    assert [s.tokens for s in response.sequences] == [[4, 5], [9, 9, 9]]
    assert [s.stop_reason for s in response.sequences] == ["stop", "length"]
    assert response.sequences[0].logprobs == [-0.5, -1.5]
    assert response.prompt_logprobs == [None, -1.25, -0.75]
    topk = response.topk_prompt_logprobs
    assert topk[0] is None and topk[1] == [(5, pytest.approx(-0.1)), (6, -2.0)]
    assert topk[2] == [(7, pytest.approx(-0.3))]


def test_sample_result_without_prompt_logprobs():
    response = deserialize_sample_response(sample_response_proto(_sample_result(with_prompt_logprobs=False)))
    assert response.prompt_logprobs is None and response.topk_prompt_logprobs is None


def test_sample_result_json_for_old_sdks():
    body = orjson.loads(orjson.dumps(sample_response_json(_sample_result())))
    assert body["sequences"][0] == {"tokens": [4, 5], "logprobs": [-0.5, -1.5], "stop_reason": "stop"}
    assert body["prompt_logprobs"] == [None, -1.25, -0.75]
    assert body["topk_prompt_logprobs"][0] is None and body["topk_prompt_logprobs"][2] == [[7, pytest.approx(-0.3)]]


def sdk_sample_body(**overrides) -> JsonObject:
    fields = dict(sampling_session_id="sess:sample:0", seq_id=7, num_samples=2,
                  prompt=types.ModelInput.from_ints([1, 2, 3]), sampling_params=types.SamplingParams(),
                  prompt_logprobs=True, topk_prompt_logprobs=2, topk_sample_logprobs=0, prompt_alt_tokens_k=0,
                  record_stability_info=False)
    fields.update(overrides)
    body = model_dump(types.SampleRequest(**fields), exclude_unset=False, exclude_none=True, mode="json")
    return parse_json_object(orjson.dumps(body))


def test_sdk_sample_request_decodes():
    params = types.SamplingParams(max_tokens=5, seed=123, stop=["\n"], temperature=0.7, top_k=20, top_p=0.9)
    req = sample_request_from_json(sdk_sample_body(sampling_params=params), MODEL)
    assert (req.sampling_session_id, req.seq_id, req.num_samples) == ("sess:sample:0", 7, 2)
    assert req.prompt_tokens.tolist() == [1, 2, 3] and req.prompt_tokens.dtype == np.int64
    assert req.prompt_logprobs and req.topk_prompt_logprobs == 2
    p = req.params
    assert (p.max_tokens, p.seed, p.top_k, p.stop_strings, p.stop_at_eos) == (5, 123, 20, ["\n"], True)
    assert math.isclose(p.temperature, 0.7) and math.isclose(p.top_p, 0.9)


def test_sdk_sample_options_decode():
    req = sample_request_from_json(sdk_sample_body(topk_sample_logprobs=4, prompt_alt_tokens_k=3,
                                                   prompt_logprobs_last_n=2), MODEL)
    assert (req.topk_sample_logprobs, req.prompt_alt_tokens_k, req.prompt_logprobs_last_n) == (4, 3, 2)
    assert req.target_prompt_token_ids is None and req.target_prompt_listed is None
    plain = sample_request_from_json(sdk_sample_body(), MODEL)
    assert (plain.topk_sample_logprobs, plain.prompt_alt_tokens_k, plain.prompt_logprobs_last_n) == (0, 0, None)


def test_sdk_target_prompt_logprobs_decode_dense_or_csr_padded_with_minus_one():
    ids = np.full((2, 3), -1, dtype=np.int64)
    ids[1, 2] = 7
    for target, listed in ((types.TensorData.from_numpy(ids), None),
                           (types.TensorData(data=[7], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 0, 1],
                                             sparse_col_indices=[2]), ids != -1)):
        wire = {"data": target.data, "dtype": target.dtype, "shape": target.shape,
                "sparse_crow_indices": target.sparse_crow_indices, "sparse_col_indices": target.sparse_col_indices}
        req = sample_request_from_json(sdk_sample_body(target_prompt_logprobs=wire), MODEL)
        assert req.target_prompt_token_ids.tolist() == ids.tolist()
        assert (req.target_prompt_listed is None) == (listed is None)
        if listed is not None:
            assert req.target_prompt_listed.tolist() == listed.tolist()


@pytest.mark.parametrize("stop, strings, token_ids, at_eos", [
    (None, [], [], True), ("END", ["END"], [], True), (["a", "b"], ["a", "b"], [], True),
    ([7, 8], [], [7, 8], True), ([], [], [], False)])
def test_stop_forms(stop, strings, token_ids, at_eos):
    params = sample_request_from_json(sdk_sample_body(sampling_params=types.SamplingParams(stop=stop)), MODEL).params
    assert (params.stop_strings, params.stop_token_ids, params.stop_at_eos) == (strings, token_ids, at_eos)
    assert params.max_tokens == DEFAULT_MAX_TOKENS  # the SDK left max_tokens out


@pytest.mark.parametrize("overrides, words", [
    ({"num_samples": 0}, ["num_samples"]),
    ({"sampling_params": types.SamplingParams(max_tokens=0)}, ["max_tokens"]),
    ({"sampling_params": types.SamplingParams(temperature=-1)}, ["temperature"]),
    ({"sampling_params": types.SamplingParams(top_p=0)}, ["top_p"]),
    ({"sampling_params": types.SamplingParams(top_p=1.5)}, ["top_p"]),
    ({"prompt": types.ModelInput.from_ints([])}, ["prompt", "empty"]),
    ({"prompt": types.ModelInput.from_ints([1, 200])}, ["prompt", "200"]),
    ({"sampling_params": types.SamplingParams(max_tokens=62)},
     ["Prompt length plus max_tokens exceeds the model's context window: 3 + 62 > 64"]),
    ({"prompt_logprobs_last_n": 3}, ["prompt_logprobs_last_n", "[1, 2]"]),
    ({"prompt_alt_tokens_k": -1}, ["prompt_alt_tokens_k", ">= 0"]),
    ({"topk_sample_logprobs": 101}, ["topk_sample_logprobs", "[0, 100]"]),
    ({"target_prompt_logprobs": {"data": [1, 2], "dtype": "int64", "shape": [1, 2]}},
     ["target_prompt_logprobs", "2 rows"]),
    ({"prompt": types.ModelInput(chunks=[types.ImageChunk(data=b"x", format="png")])}, ["image"]),
])
def test_invalid_sample_requests_are_400(overrides, words):
    error = http_error(sample_request_from_json, sdk_sample_body(**overrides), MODEL)
    assert error.status == 400
    for word in words:
        assert word in error.detail, error.detail


def test_mixed_stop_list_is_400():
    body = sdk_sample_body()
    body.value["sampling_params"]["stop"] = ["a", 3]
    assert "mix" in http_error(sample_request_from_json, body, MODEL).detail


# -- other JSON bodies ---------------------------------------------------------------------


def _sdk_json(request) -> JsonObject:
    return parse_json_object(orjson.dumps(model_dump(request, exclude_unset=False, exclude_none=True, mode="json")))


def test_create_model_lora_and_its_rank_check():
    request = types.CreateModelRequest(session_id="sess", model_seq_id=2, base_model="test/model",
                                       lora_config=types.LoraConfig(rank=8, seed=3, train_unembed=False))
    req = create_model_from_json(_sdk_json(request))
    assert (req.session_id, req.model_seq_id, req.base_model) == ("sess", 2, "test/model")
    assert (req.lora.rank, req.lora.seed, req.lora.train_unembed, req.lora.train_mlp) == (8, 3, False, True)
    for rank in (12, 0):
        bad = types.CreateModelRequest(session_id="s", model_seq_id=0, base_model="m",
                                       lora_config=types.LoraConfig(rank=rank))
        assert "power of 2" in http_error(create_model_from_json, _sdk_json(bad)).detail


def test_optim_step_adam_and_dimuon():
    adam = types.AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=1.0)
    req = optim_step_from_json(_sdk_json(types.OptimStepRequest(optim_params=adam, model_id=MODEL_ID, seq_id=2)))
    assert (req.model_id, req.seq_id) == (MODEL_ID, 2)
    assert req.adam == AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=1.0)
    dimuon = types.OptimStepRequest(optim_params=types.DimuonParams(learning_rate=1e-3), model_id=MODEL_ID, seq_id=2)
    assert "not supported" in http_error(optim_step_from_json, _sdk_json(dimuon)).detail


def test_save_weights_for_sampler_named_and_ephemeral():
    named = save_weights_for_sampler_from_json(_sdk_json(types.SaveWeightsForSamplerRequest(
        model_id=MODEL_ID, path="ckpt-1", seq_id=3)))
    assert (named.name, named.sampling_session_seq_id, named.seq_id) == ("ckpt-1", None, 3)
    ephemeral = save_weights_for_sampler_from_json(_sdk_json(types.SaveWeightsForSamplerRequest(
        model_id=MODEL_ID, sampling_session_seq_id=0, kind="inflight", seq_id=4)))
    assert (ephemeral.name, ephemeral.sampling_session_seq_id) == (None, 0)
    neither = _sdk_json(types.SaveWeightsForSamplerRequest(model_id=MODEL_ID, seq_id=5))
    assert http_error(save_weights_for_sampler_from_json, neither).status == 400


def test_save_weights_needs_a_name():
    req = save_weights_from_json(_sdk_json(types.SaveWeightsRequest(model_id=MODEL_ID, path="after-2", seq_id=6,
                                                                    overwrite=True, ttl_seconds=7200)))
    assert (req.name, req.seq_id, req.overwrite, req.ttl_seconds) == ("after-2", 6, True, 7200)
    unnamed = _sdk_json(types.SaveWeightsRequest(model_id=MODEL_ID, seq_id=6))
    assert "path" in http_error(save_weights_from_json, unnamed).detail


def test_load_weights_both_addressing_modes():
    path = f"tinker://{MODEL_ID}/weights/after-2"
    legacy = load_weights_from_json(_sdk_json(types.LoadWeightsRequest(
        model_id=MODEL_ID, seq_id=3, path=path, optimizer=True)), MODEL)
    assert (legacy.model_id, legacy.seq_id, legacy.with_optimizer, legacy.session_id) == (MODEL_ID, 3, True, None)
    created = load_weights_from_json(_sdk_json(types.LoadWeightsRequest(
        session_id="sess", model_seq_id=1, path=path, optimizer=False, base_model="test/model")), MODEL)
    assert (created.session_id, created.model_seq_id, created.model_id, created.path) == ("sess", 1, None, path)
    other_model = _sdk_json(types.LoadWeightsRequest(session_id="s", model_seq_id=1, path=path, optimizer=False,
                                                     base_model="other/model"))
    assert "other/model" in http_error(load_weights_from_json, other_model, MODEL).detail
    neither = _sdk_json(types.LoadWeightsRequest(path=path, optimizer=False))
    assert "model_id" in http_error(load_weights_from_json, neither, MODEL).detail
