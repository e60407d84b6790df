"""The `tinker_public` protobuf schema (protocol doc §8), rebuilt from descriptors.

The server must not depend on the SDK, so instead of importing `tinker_public_pb2`
the schema is written down here as data and turned into a FileDescriptorProto.
It lives in a private DescriptorPool: the SDK's own module registers the same file
name in the default pool, and tests load both in one process.

Field numbers, labels, proto3 `optional`s (synthetic oneofs), real oneofs and map
entries match the SDK's descriptor exactly (tests/unit/test_proto.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tinker_public"
FILE_NAME = "tinker_public.proto"


class StopReason(IntEnum):
    STOP_REASON_STOP = 0
    STOP_REASON_LENGTH = 1


class DType(IntEnum):
    DTYPE_UNSPECIFIED = 0
    DTYPE_FLOAT32 = 1
    DTYPE_INT64 = 2
    DTYPE_INT32 = 3
    DTYPE_BFLOAT16 = 4


@dataclass(frozen=True)
class _Field:
    name: str
    number: int
    type: str  # a scalar ("bytes", "int64", …) or a message / enum name of this schema
    repeated: bool = False
    optional: bool = False  # proto3 `optional`: explicit presence
    oneof: str | None = None
    map_key: str | None = None  # set for `map<map_key, type>`


_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FDP.TYPE_DOUBLE, "float": _FDP.TYPE_FLOAT, "int64": _FDP.TYPE_INT64,
    "uint64": _FDP.TYPE_UINT64, "int32": _FDP.TYPE_INT32, "uint32": _FDP.TYPE_UINT32,
    "bool": _FDP.TYPE_BOOL, "string": _FDP.TYPE_STRING, "bytes": _FDP.TYPE_BYTES,
}
_ENUMS: tuple[type[IntEnum], ...] = (StopReason, DType)
_ENUM_NAMES = {e.__name__ for e in _ENUMS}

_SCHEMA: dict[str, tuple[_Field, ...]] = {
    "SampleResponse": (
        _Field("sequences", 1, "SampledSequence", repeated=True),
        _Field("prompt_logprobs", 2, "bytes", optional=True),
        _Field("topk_prompt_logprobs", 3, "TopkLogprobs", optional=True),
        _Field("prompt_cache_hit_tokens", 4, "int32"),
        _Field("target_prompt_logprobs", 5, "Tensor", optional=True),
        _Field("prompt_alt_tokens", 6, "PromptAltTokens", optional=True),
    ),
    "PromptAltTokens": (_Field("tokens", 1, "Tensor"), _Field("logprobs", 2, "Tensor")),
    "SampledSequence": (
        _Field("stop_reason", 1, "StopReason"),
        _Field("tokens", 2, "bytes"),
        _Field("logprobs", 3, "bytes", optional=True),
        _Field("topk_sampled_logprobs", 4, "TopkLogprobs", optional=True),
    ),
    "TopkLogprobs": (
        _Field("token_ids", 1, "bytes"), _Field("logprobs", 2, "bytes"),
        _Field("k", 3, "uint32"), _Field("length", 4, "uint32"),
    ),
    "SparseCsr": (_Field("values", 1, "bytes"), _Field("crow_indices", 2, "bytes"), _Field("col_indices", 3, "bytes")),
    "Tensor": (
        _Field("dense", 1, "bytes", oneof="encoding"),
        _Field("sparse_csr", 2, "SparseCsr", oneof="encoding"),
        _Field("dtype", 3, "DType"),
        _Field("shape", 4, "int64", repeated=True),
    ),
    "BatchedTensor": (
        _Field("data", 1, "bytes"), _Field("offsets", 2, "bytes"), _Field("dtype", 3, "DType"),
        _Field("trailing_shape", 4, "int64", repeated=True),
    ),
    "ArrayRecord": (
        _Field("type_tag", 1, "string"),
        _Field("fields", 2, "BatchedTensor", map_key="string"),
        _Field("num_datums", 3, "int64"),
    ),
    "ForwardBackwardOutput": (
        _Field("loss_fn_output_type", 1, "string"),
        _Field("loss_fn_outputs", 2, "ArrayRecord", repeated=True),
        _Field("metrics", 3, "double", map_key="string"),
    ),
    "ForwardBackwardRequest": (
        _Field("model_id", 1, "string"),
        _Field("seq_id", 2, "int32"),
        _Field("data", 3, "Datum", repeated=True),
        _Field("loss_fn", 4, "string"),
        _Field("loss_fn_config", 5, "double", map_key="string"),
        _Field("forward_only", 6, "bool"),
        _Field("loss_fn_config_v2", 7, "LossConfigValue", map_key="string"),
    ),
    "LossConfigValue": (_Field("number", 1, "double", oneof="value"), _Field("text", 2, "string", oneof="value")),
    "Datum": (
        _Field("model_input", 1, "Chunk", repeated=True),
        _Field("loss_fn_inputs", 2, "Tensor", map_key="string"),
        _Field("model_input_spans", 3, "ProvenanceSpan", repeated=True),
        _Field("loss_fn_input_spans", 4, "ProvenanceSpan", repeated=True),
    ),
    "ProvenanceSpan": (
        _Field("prompt_tokens", 1, "PromptProvenanceSpan", oneof="span"),
        _Field("sampled_tokens", 2, "SampledProvenanceSpan", oneof="span"),
    ),
    "PromptProvenanceSpan": (
        _Field("sequence_id", 1, "string"), _Field("offset", 2, "int64"), _Field("length", 3, "int64"),
    ),
    "SampledProvenanceSpan": (
        _Field("sequence_id", 1, "string"), _Field("offset", 2, "int64"), _Field("length", 3, "int64"),
    ),
    "Chunk": (
        _Field("encoded_text", 1, "EncodedTextChunk", oneof="chunk"),
        _Field("image", 2, "ImageChunk", oneof="chunk"),
        _Field("dmel", 3, "DmelChunk", oneof="chunk"),
    ),
    "EncodedTextChunk": (_Field("tokens", 1, "bytes"),),
    "ImageChunk": (
        _Field("data", 1, "bytes"), _Field("format", 2, "string"),
        _Field("expected_tokens", 3, "int32", optional=True),
        _Field("override_dimensions", 4, "ImageDimensions", optional=True),
    ),
    "ImageDimensions": (_Field("width", 1, "uint32"), _Field("height", 2, "uint32")),
    "DmelChunk": (_Field("dmel", 1, "bytes"),),
    "SamplingParams": (
        _Field("max_tokens", 1, "int32", optional=True),
        _Field("seed", 2, "uint64", optional=True),
        _Field("temperature", 3, "float", optional=True),
        _Field("top_k", 4, "int32", optional=True),
        _Field("top_p", 5, "float", optional=True),
        _Field("stop_strs", 6, "StopStrings", oneof="stop"),
        _Field("stop_tokens", 7, "StopTokens", oneof="stop"),
    ),
    "StopStrings": (_Field("values", 1, "string", repeated=True),),
    "StopTokens": (_Field("values", 1, "int32", repeated=True),),
}


def _camel(snake: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_"))


def _set_type(proto: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    if type_name in _SCALARS:
        proto.type = _SCALARS[type_name]
    else:
        proto.type = _FDP.TYPE_ENUM if type_name in _ENUM_NAMES else _FDP.TYPE_MESSAGE
        proto.type_name = f".{PACKAGE}.{type_name}"


def _add_map_entry(message: descriptor_pb2.DescriptorProto, field: _Field) -> str:
    """Declare the nested `<Field>Entry` type protoc generates for a map field."""
    entry = message.nested_type.add(name=f"{_camel(field.name)}Entry")
    entry.options.map_entry = True
    key = entry.field.add(name="key", number=1, label=_FDP.LABEL_OPTIONAL)
    _set_type(key, field.map_key)
    value = entry.field.add(name="value", number=2, label=_FDP.LABEL_OPTIONAL)
    _set_type(value, field.type)
    return f".{PACKAGE}.{message.name}.{entry.name}"


def _message_proto(name: str, fields: tuple[_Field, ...]) -> descriptor_pb2.DescriptorProto:
    message = descriptor_pb2.DescriptorProto(name=name)
    # real oneofs first, then one synthetic oneof per proto3 `optional`, as protoc orders them
    oneofs = list(dict.fromkeys(f.oneof for f in fields if f.oneof))
    oneofs += [f"_{f.name}" for f in fields if f.optional]
    for oneof in oneofs:
        message.oneof_decl.add(name=oneof)
    for field in fields:
        proto = message.field.add(name=field.name, number=field.number)
        if field.map_key is not None:
            proto.label, proto.type = _FDP.LABEL_REPEATED, _FDP.TYPE_MESSAGE
            proto.type_name = _add_map_entry(message, field)
            continue
        proto.label = _FDP.LABEL_REPEATED if field.repeated else _FDP.LABEL_OPTIONAL
        _set_type(proto, field.type)
        if field.oneof:
            proto.oneof_index = oneofs.index(field.oneof)
        if field.optional:
            proto.oneof_index = oneofs.index(f"_{field.name}")
            proto.proto3_optional = True
    return message


def file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    """The schema as protoc would have compiled it."""
    file = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    for name, fields in _SCHEMA.items():
        file.message_type.append(_message_proto(name, fields))
    for enum in _ENUMS:
        proto = file.enum_type.add(name=enum.__name__)
        for member in enum:
            proto.value.add(name=member.name, number=member.value)
    return file


_POOL = descriptor_pool.DescriptorPool()
DESCRIPTOR = _POOL.Add(file_descriptor_proto())


def message_class(name: str):
    """The generated class of one message of the schema."""
    return message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name[name])


SampleResponse = message_class("SampleResponse")
SampledSequence = message_class("SampledSequence")
TopkLogprobs = message_class("TopkLogprobs")
Tensor = message_class("Tensor")
BatchedTensor = message_class("BatchedTensor")
ArrayRecord = message_class("ArrayRecord")
ForwardBackwardOutput = message_class("ForwardBackwardOutput")
ForwardBackwardRequest = message_class("ForwardBackwardRequest")
Datum = message_class("Datum")
Chunk = message_class("Chunk")
