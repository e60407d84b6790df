"""Our rebuilt `tinker_public` schema is the SDK's: same descriptor, bytes interchangeable."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.json_format import MessageToDict
from tinker.proto import tinker_public_pb2 as sdk_pb

from api import proto as ours


def _file_proto(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
    result = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(result)
    return result


def _field_summary(message: descriptor_pb2.DescriptorProto) -> list[tuple]:
    oneofs = [o.name for o in message.oneof_decl]
    return [(f.name, f.number, f.type, f.label, f.type_name,
             oneofs[f.oneof_index] if f.HasField("oneof_index") else None, f.proto3_optional)
            for f in message.field]


SDK_FILE = _file_proto(sdk_pb.DESCRIPTOR)
OUR_FILE = _file_proto(ours.DESCRIPTOR)
SDK_MESSAGES = {m.name: m for m in SDK_FILE.message_type}
OUR_MESSAGES = {m.name: m for m in OUR_FILE.message_type}


def test_same_messages_enums_and_syntax():
    assert OUR_FILE.package == SDK_FILE.package == "tinker_public"
    assert OUR_FILE.syntax == SDK_FILE.syntax == "proto3"
    assert set(OUR_MESSAGES) == set(SDK_MESSAGES)
    assert list(OUR_FILE.enum_type) == list(SDK_FILE.enum_type)


@pytest.mark.parametrize("name", sorted(SDK_MESSAGES))
def test_message_structure_matches_the_sdk(name):
    ours_msg, sdk_msg = OUR_MESSAGES[name], SDK_MESSAGES[name]
    assert _field_summary(ours_msg) == _field_summary(sdk_msg)
    assert [o.name for o in ours_msg.oneof_decl] == [o.name for o in sdk_msg.oneof_decl]
    for ours_entry, sdk_entry in zip(ours_msg.nested_type, sdk_msg.nested_type, strict=True):
        assert ours_entry.name == sdk_entry.name and ours_entry.options.map_entry == sdk_entry.options.map_entry
        assert _field_summary(ours_entry) == _field_summary(sdk_entry)
    assert ours_msg == sdk_msg  # nothing else differs either


def test_our_pool_does_not_clash_with_the_sdks():
    assert ours.ForwardBackwardRequest is not sdk_pb.ForwardBackwardRequest
    assert ours.ForwardBackwardRequest.DESCRIPTOR.full_name == sdk_pb.ForwardBackwardRequest.DESCRIPTOR.full_name


def _cross_parse(msg, target_cls):
    """Serialize `msg`, parse it as `target_cls`, and check nothing was lost either way."""
    data = msg.SerializeToString(deterministic=True)
    parsed = target_cls.FromString(data)
    assert MessageToDict(parsed) == MessageToDict(msg)
    assert parsed.SerializeToString(deterministic=True) == data
    return parsed


def _fill_fwdbwd_request(pb):
    req = pb.ForwardBackwardRequest(model_id="s:train:0", seq_id=3, loss_fn="ppo", forward_only=True)
    req.loss_fn_config["clip_low_threshold"] = 0.8
    req.loss_fn_config_v2["clip_low_threshold"].number = 0.8
    req.loss_fn_config_v2["loss_id"].text = "abc"
    datum = req.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(5, dtype="<i4").tobytes()
    image = datum.model_input.add().image
    image.data, image.format, image.expected_tokens = b"\x89PNG", "png", 4
    dense = datum.loss_fn_inputs["weights"]
    dense.dtype, dense.dense = ours.DType.DTYPE_FLOAT32, np.ones(5, "<f4").tobytes()
    dense.shape.append(5)
    sparse = datum.loss_fn_inputs["target_tokens"]
    sparse.dtype = ours.DType.DTYPE_INT64
    sparse.shape.extend([5, 2])
    sparse.sparse_csr.values = np.array([7, 9], "<i8").tobytes()
    sparse.sparse_csr.crow_indices = np.array([0, 1, 1, 2, 2, 2], "<i8").tobytes()
    sparse.sparse_csr.col_indices = np.array([0, 1], "<i8").tobytes()
    datum.model_input_spans.add().sampled_tokens.sequence_id = "seq-1"
    return req


def _fill_fwdbwd_output(pb):
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics={"loss:sum": 1.5})
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=2)
    field = record.fields["logprobs"]
    field.data = np.arange(6, dtype="<f4").tobytes()
    field.offsets = np.array([0, 8, 24], "<i8").tobytes()
    field.dtype = ours.DType.DTYPE_FLOAT32
    return out


def _fill_sample_response(pb):
    resp = pb.SampleResponse(prompt_logprobs=np.array([np.nan, -1.0], "<f4").tobytes())
    seq = resp.sequences.add(stop_reason=ours.StopReason.STOP_REASON_LENGTH, tokens=np.arange(3, dtype="<i4").tobytes())
    seq.logprobs = np.zeros(3, "<f4").tobytes()
    topk = resp.topk_prompt_logprobs
    topk.token_ids, topk.logprobs = np.zeros(4, "<i4").tobytes(), np.full(4, -99999.0, "<f4").tobytes()
    topk.k, topk.length = 2, 2
    return resp


@pytest.mark.parametrize("fill", [_fill_fwdbwd_request, _fill_fwdbwd_output, _fill_sample_response])
def test_bytes_cross_parse_both_ways(fill):
    name = type(fill(sdk_pb)).DESCRIPTOR.name
    _cross_parse(fill(ours), getattr(sdk_pb, name))
    _cross_parse(fill(sdk_pb), ours.message_class(name))


def test_proto3_optional_presence_survives():
    resp = ours.SampleResponse()
    resp.sequences.add(tokens=b"")
    parsed = sdk_pb.SampleResponse.FromString(resp.SerializeToString())
    assert not parsed.HasField("prompt_logprobs") and not parsed.HasField("topk_prompt_logprobs")
    assert not parsed.sequences[0].HasField("logprobs")
