"""Messages round-trip through msgpack + raw array frames, zero-copy, no pickle."""

import numpy as np
import pytest

from cluster.codec import CodecError, decode, encode
from cluster.messages import (
    DatumBatch, ErrorResp, ForwardBackwardReq, ForwardBackwardResult, RetrieveFutureResp, SampledSequence,
    SampleResult,
)

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.int16, np.uint8, np.float16, np.bool_]


def roundtrip(msg):
    return decode([bytes(f) for f in encode(msg)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (7,), (3, 4), (2, 0, 5)])
def test_arrays_of_every_dtype_and_shape_roundtrip(dtype, shape):
    arr = (np.arange(int(np.prod(shape))) % 5).astype(dtype).reshape(shape)
    out = roundtrip(ForwardBackwardResult(lengths=arr, logprobs=arr, elementwise_loss=arr))
    for got in (out.lengths, out.logprobs, out.elementwise_loss):
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_nested_messages_and_dict_of_arrays():
    batch = DatumBatch(tokens=np.arange(10), lengths=np.array([4, 6]),
                       loss_inputs={"weights": np.ones(10, np.float32), "target_tokens": np.zeros((10, 3), np.int64)})
    msg = ForwardBackwardReq(model_id="s:train:0", seq_id=3, loss_fn="cross_entropy",
                             loss_fn_config={"beta": 0.1, "mode": "x"}, batch=batch, call_id=42)
    frames = encode(msg)
    assert len(frames) == 1 + 4  # header + one frame per array
    out = roundtrip(msg)
    assert out.call_id == 42 and out.loss_fn_config == {"beta": 0.1, "mode": "x"}
    assert out.batch.loss_inputs["target_tokens"].shape == (10, 3)
    np.testing.assert_array_equal(out.batch.select(1, 2).tokens, np.arange(4, 10))


def test_optional_arrays_and_lists_of_messages():
    seqs = [SampledSequence(tokens=np.array([1, 2], np.int32), logprobs=np.array([-1.0, -2.0], np.float32),
                            stop_reason="stop")] * 2
    out = roundtrip(RetrieveFutureResp(status="done", result=SampleResult(sequences=seqs)))
    assert out.result.prompt_logprobs is None
    assert [s.stop_reason for s in out.result.sequences] == ["stop", "stop"]
    np.testing.assert_array_equal(out.result.sequences[1].logprobs, [-1.0, -2.0])


def test_decoded_arrays_are_zero_copy_views_of_the_frames():
    frames = encode(ForwardBackwardResult(lengths=np.arange(1000), logprobs=np.zeros(1), elementwise_loss=np.zeros(1)))
    out = decode(frames)
    assert not out.lengths.flags.owndata


def test_object_arrays_and_unknown_types_are_refused():
    with pytest.raises(CodecError):
        encode(ErrorResp(detail=np.array([object()])))
    with pytest.raises(CodecError):
        encode(ErrorResp(detail=object()))


def test_a_message_stored_as_one_blob_comes_back_whole():
    from cluster.codec import decode_blob, encode_blob

    result = SampleResult(sequences=[SampledSequence(tokens=np.arange(5, dtype=np.int32),
                                                     logprobs=np.linspace(-1, 0, 5, dtype=np.float32))],
                          prompt_logprobs=np.array([np.nan, -0.5], dtype=np.float32))
    blob = encode_blob(result)
    out = decode_blob(blob)
    assert out.sequences[0].tokens.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(out.sequences[0].logprobs, result.sequences[0].logprobs)
    np.testing.assert_array_equal(out.prompt_logprobs, result.prompt_logprobs)
    for broken in (blob[:3], blob[:-1], blob + b"x"):
        with pytest.raises(CodecError):
            decode_blob(broken)
