"""forward_backward: request bodies to `ForwardBackwardReq`, results to the wire.

The 0.38 SDK sends a protobuf `ForwardBackwardRequest` (zstd-compressed when the
server's client config asks for it) and wants a protobuf `ForwardBackwardOutput`
back; SDKs up to 0.20 send JSON and (up to 0.16) want JSON. Both request forms end
in the same validation, so a bad datum is a 400 naming the datum and the field
before anything is queued.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from api import proto
from api.errors import HttpError, bad_request
from api.json_fields import JsonObject, as_json_object
from api.tensors import tensor_data_json, tensor_from_json, tensor_from_proto
from cluster.config import ModelConfig
from cluster.loss_specs import TARGET_TOKENS, LossSpec, supported_loss_spec
from cluster.messages import DatumBatch, DatumProvenance, ForwardBackwardReq, ForwardBackwardResult, ProvenanceSpan

MAX_BODY_BYTES = 256 * 2**20  # also the cap on a decompressed body
OUTPUT_TYPE = "ArrayRecord"  # the SDK exposes this name as `loss_fn_output_type`


@dataclass
class _Datum:
    tokens: np.ndarray  # int64 [n]
    inputs: dict[str, np.ndarray]
    provenance: DatumProvenance | None = None  # protobuf requests only (SDK 0.38's Datum.with_provenance)


# -- protobuf requests ----------------------------------------------------------------


def decompress_body(body: bytes, content_encoding: str) -> bytes:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise HttpError(415, f"Content-Encoding {content_encoding!r} is not supported; use zstd or none")
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            raw = reader.read(MAX_BODY_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise bad_request(f"request body is not valid zstd: {exc}") from None
    if len(raw) > MAX_BODY_BYTES:
        raise HttpError(413, f"decompressed request body exceeds {MAX_BODY_BYTES} bytes")
    return raw


def parse_forward_backward_proto(body: bytes):
    """The protobuf ForwardBackwardRequest, not yet checked."""
    msg = proto.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise bad_request(f"request body is not a protobuf ForwardBackwardRequest: {exc}") from None
    return msg


def forward_backward_from_proto(msg, model: ModelConfig) -> ForwardBackwardReq:
    datums = [_datum_from_proto(i, datum) for i, datum in enumerate(msg.data)]
    return _request(msg.model_id, msg.seq_id, msg.loss_fn, _config_from_proto(msg), msg.forward_only,
                    datums, model)


def _config_from_proto(msg) -> dict[str, float | str]:
    # the SDK writes every value into v2 (strings only there) and mirrors numbers
    # into the legacy map for old servers; v2 wins whenever it is present
    if not msg.loss_fn_config_v2:
        return {key: float(value) for key, value in msg.loss_fn_config.items()}
    config: dict[str, float | str] = {}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind is None:
            raise bad_request(f"loss_fn_config_v2[{key!r}] has neither a number nor a text value")
        config[key] = float(value.number) if kind == "number" else value.text
    return config


def _datum_from_proto(index: int, datum) -> _Datum:
    where = f"data[{index}]"
    pieces = []
    for j, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise _unsupported_chunk(f"{where}.model_input[{j}]", kind)
        tokens = chunk.encoded_text.tokens
        if len(tokens) % 4:
            raise bad_request(f"{where}.model_input[{j}] tokens are not a whole number of int32 values")
        pieces.append(np.frombuffer(tokens, dtype="<i4"))
    tokens = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
    inputs = {name: tensor_from_proto(tensor, f"{where}.loss_fn_inputs[{name!r}]")
              for name, tensor in datum.loss_fn_inputs.items()}
    provenance = None
    if datum.model_input_spans or datum.loss_fn_input_spans:
        provenance = DatumProvenance(
            model_input=_spans_from_proto(f"{where}.model_input_spans", datum.model_input_spans),
            targets=_spans_from_proto(f"{where}.loss_fn_input_spans", datum.loss_fn_input_spans))
    return _Datum(tokens, inputs, provenance)


def _spans_from_proto(where: str, spans) -> list[ProvenanceSpan]:
    out = []
    for j, span in enumerate(spans):
        kind = span.WhichOneof("span")
        if kind is None:
            raise bad_request(f"{where}[{j}] is an empty span: set prompt_tokens or sampled_tokens")
        run = getattr(span, kind)
        out.append(ProvenanceSpan(sequence_id=run.sequence_id, sampled=kind == "sampled_tokens",
                                  offset=int(run.offset), length=int(run.length)))
    return out


def _unsupported_chunk(where: str, kind: str | None) -> HttpError:
    if kind is None:
        return bad_request(f"{where} is an empty chunk")
    return bad_request(f"{where} has chunk type {kind!r}; this server supports only encoded_text (token) chunks")


# -- JSON requests (SDKs up to 0.20) ----------------------------------------------------


def forward_backward_from_json(body: JsonObject, model: ModelConfig, *, forward_only: bool = False) -> ForwardBackwardReq:
    # SDKs up to 0.16 nest the inputs under "forward_backward_input" ("forward_input" on /forward)
    nested = "forward_input" if forward_only else "forward_backward_input"
    inner = body.get_object(nested) if body.has(nested) else body
    data = inner.get_list("data")
    datums = [_datum_from_json(as_json_object(d, f"data[{i}]")) for i, d in enumerate(data)]
    config: dict[str, float | str] = {}
    if inner.has("loss_fn_config"):
        for key, value in inner.get_object("loss_fn_config").value.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise bad_request(f"loss_fn_config[{key!r}] must be a number or a string")
            config[key] = value if isinstance(value, str) else float(value)
    return _request(body.get_str("model_id"), body.get_int("seq_id"), inner.get_str("loss_fn"), config,
                    forward_only or body.get_bool("forward_only", False), datums, model)


def model_input_tokens_from_json(model_input: JsonObject) -> np.ndarray:
    """A JSON ModelInput's tokens (int64); any chunk but encoded_text is a 400."""
    pieces = []
    for j, chunk in enumerate(model_input.get_list("chunks")):
        chunk = as_json_object(chunk, f"{model_input.where}.chunks[{j}]")
        kind = chunk.get_str("type", "encoded_text")  # SDKs up to 0.16 leave the default type out
        if kind != "encoded_text":
            raise _unsupported_chunk(chunk.where, kind)
        tokens = chunk.get_list("tokens")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request(f"{chunk.where}.tokens must be integers")
        try:
            pieces.append(np.asarray(tokens, dtype=np.int64))
        except OverflowError:
            raise bad_request(f"{chunk.where}.tokens has a value out of the int64 range") from None
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def _datum_from_json(datum: JsonObject) -> _Datum:
    tokens = model_input_tokens_from_json(datum.get_object("model_input"))
    loss_inputs = datum.get_object("loss_fn_inputs", JsonObject({}, datum.path("loss_fn_inputs")))
    inputs = {}
    for name, value in loss_inputs.value.items():
        inputs[name] = tensor_from_json(as_json_object(value, f"{datum.where}.loss_fn_inputs[{name!r}]"))
    return _Datum(tokens, inputs)


# -- validation ------------------------------------------------------------------------


def _request(model_id: str, seq_id: int, loss_fn: str, config: dict[str, float | str], forward_only: bool,
             datums: list[_Datum], model: ModelConfig) -> ForwardBackwardReq:
    if not model_id:
        raise bad_request("model_id is required")
    try:
        spec = supported_loss_spec(loss_fn)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    if not datums:
        raise bad_request("data is empty: forward_backward needs at least one datum")
    checked = [_checked_datum(f"data[{i}]", d, spec, model) for i, d in enumerate(datums)]
    for i, datum in enumerate(checked[1:], start=1):
        for name in spec.input_names:
            if datum.inputs[name].shape[1:] != checked[0].inputs[name].shape[1:]:
                raise bad_request(f"data[{i}].loss_fn_inputs[{name!r}] has shape {list(datum.inputs[name].shape)} "
                                  f"but data[0]'s is {list(checked[0].inputs[name].shape)}: every datum of a "
                                  "request needs the same trailing dimensions")
    batch = DatumBatch(
        tokens=np.concatenate([d.tokens for d in checked]),
        lengths=np.array([len(d.tokens) for d in checked], dtype=np.int64),
        loss_inputs={name: np.concatenate([d.inputs[name] for d in checked]) for name in spec.input_names},
    )
    provenance = [_checked_provenance(f"data[{i}]", d, spec) for i, d in enumerate(checked)] \
        if spec.needs_provenance else None
    return ForwardBackwardReq(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn, loss_fn_config=config,
                              forward_only=forward_only, batch=batch, provenance=provenance)


def _checked_provenance(where: str, datum: _Datum, spec: LossSpec) -> DatumProvenance:
    """The datum's spans, each well formed and together tiling model_input and target_tokens.

    Whether they match the recorded samples is the controller's to check: it holds them.
    """
    if datum.provenance is None:
        raise bad_request(f"{where} has no provenance spans: {spec.name} trains on samples recorded with "
                          "record_stability_info=True, and every datum must name them (Datum.with_provenance: "
                          "model_input_spans and loss_fn_input_spans)")
    targets = datum.inputs[TARGET_TOKENS]
    if targets.ndim != 1:
        raise bad_request(f"{where}.loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; {spec.name} "
                          f"takes one target per position ([{len(targets)}])")
    _check_tiling(f"{where}.model_input_spans", datum.provenance.model_input, "model_input", len(datum.tokens))
    _check_tiling(f"{where}.loss_fn_input_spans", datum.provenance.targets, "target_tokens", len(targets))
    return datum.provenance


def _check_tiling(where: str, spans: list[ProvenanceSpan], field: str, length: int) -> None:
    for j, span in enumerate(spans):
        if not span.sequence_id or span.offset < 0 or span.length < 0:
            raise bad_request(f"{where}[{j}] needs a sequence_id, an offset >= 0 and a length >= 0; got "
                              f"{span.sequence_id!r}, {span.offset}, {span.length}")
    covered = sum(span.length for span in spans)
    if covered != length:
        raise bad_request(f"{where} cover {covered} positions but {field} has {length}: the spans must tile it "
                          "exactly, in order")


def _checked_datum(where: str, datum: _Datum, spec: LossSpec, model: ModelConfig) -> _Datum:
    """The datum with every input of the loss present, typed, and shaped like target_tokens."""
    n = len(datum.tokens)
    if n == 0:
        raise bad_request(f"{where}.model_input has no tokens")
    if n > model.max_context:
        raise bad_request(f"{where}.model_input has {n} tokens, more than the model's context window "
                          f"of {model.max_context}")
    check_token_ids(f"{where}.model_input", datum.tokens, model.vocab_size)
    unknown = sorted(set(datum.inputs) - set(spec.input_names))
    if unknown:
        raise bad_request(f"{where}.loss_fn_inputs has {unknown}, which {spec.name} does not take "
                          f"(it takes {spec.input_names})")
    if TARGET_TOKENS not in datum.inputs:
        raise bad_request(f"{where}.loss_fn_inputs needs {TARGET_TOKENS!r} for {spec.name}")
    targets = datum.inputs[TARGET_TOKENS]
    if targets.ndim not in (1, 2) or targets.shape[0] != n:
        raise bad_request(f"{where}.loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; it must be "
                          f"[{n}] or [{n}, K]: one row per model_input token ({n})")
    inputs = {}
    for spec_input in spec.inputs:
        field = f"{where}.loss_fn_inputs[{spec_input.name!r}]"
        value = datum.inputs.get(spec_input.name)
        if value is None:
            if spec_input.fill is None:
                raise bad_request(f"{field} is required by {spec.name}")
            value = np.full(targets.shape, spec_input.fill, dtype=np.float32)
        if value.shape != targets.shape:
            raise bad_request(f"{field} has shape {list(value.shape)}, but target_tokens has "
                              f"{list(targets.shape)}; they must match")
        if spec_input.dtype == "int64":
            if not np.issubdtype(value.dtype, np.integer):
                raise bad_request(f"{field} must hold integer token ids (int64), got {value.dtype}")
            check_token_ids(field, value, model.vocab_size)
            inputs[spec_input.name] = value.astype(np.int64, copy=False)
        else:
            inputs[spec_input.name] = value.astype(np.float32, copy=False)
    return _Datum(datum.tokens, inputs, datum.provenance)


def check_token_ids(where: str, ids: np.ndarray, vocab_size: int) -> None:
    """Token ids must lie in [0, vocab_size); vocab_size 0 means unknown (no check)."""
    if not ids.size:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size and high >= vocab_size):
        bound = vocab_size if vocab_size else "inf"
        raise bad_request(f"{where} has token ids outside [0, {bound}) (min {low}, max {high})")


# -- results -----------------------------------------------------------------------------


def _per_datum_fields(result: ForwardBackwardResult) -> dict[str, np.ndarray]:
    return {"logprobs": result.logprobs, "elementwise_loss": result.elementwise_loss}


def forward_backward_output_proto(result: ForwardBackwardResult) -> bytes:
    """One ArrayRecord: each field's datums back to back, with byte offsets per datum."""
    lengths = np.asarray(result.lengths, dtype=np.int64)
    out = proto.ForwardBackwardOutput(loss_fn_output_type=OUTPUT_TYPE, metrics=result.metrics)
    record = out.loss_fn_outputs.add(type_tag=OUTPUT_TYPE, num_datums=len(lengths))
    for name, values in _per_datum_fields(result).items():
        values = np.ascontiguousarray(values, dtype="<f4")
        bytes_per_token = values.itemsize * int(np.prod(values.shape[1:], dtype=np.int64))
        offsets = np.concatenate([[0], np.cumsum(lengths * bytes_per_token)]).astype("<i8")
        field = record.fields[name]
        field.data, field.offsets = values.tobytes(), offsets.tobytes()
        field.dtype = proto.DType.DTYPE_FLOAT32
        field.trailing_shape.extend(values.shape[1:])
    return out.SerializeToString()


def forward_backward_output_json(result: ForwardBackwardResult) -> dict[str, Any]:
    bounds = np.concatenate([[0], np.cumsum(result.lengths)]).astype(int)
    fields = _per_datum_fields(result)
    outputs = [{name: tensor_data_json(values[bounds[i]:bounds[i + 1]]) for name, values in fields.items()}
               for i in range(len(result.lengths))]
    return {"loss_fn_output_type": OUTPUT_TYPE, "loss_fn_outputs": outputs,
            "metrics": {k: float(v) for k, v in result.metrics.items()}}
