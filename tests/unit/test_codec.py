"""Messages round-trip through msgpack + raw array frames (the small arrays sharing one), zero-copy, no pickle."""

import numpy as np
import pytest

from cluster.codec import SMALL_ARRAY_BYTES, CodecError, decode, encode
from cluster.messages import (
    DatumBatch, EngineLoadAdapterReq, ErrorResp, ForwardBackwardReq, ForwardBackwardResult, LoraSpec,
    RetrieveFutureResp, SampledSequence, SampleResult,
)

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.int16, np.uint8, np.float16, np.bool_]


def roundtrip(msg):
    return decode([bytes(f) for f in encode(msg)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 5), (SMALL_ARRAY_BYTES // 4, 3)])
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
    assert len(frames) == 1 + 1  # header + the small arrays' frame
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
    large = np.arange(SMALL_ARRAY_BYTES // 8, dtype=np.int64)  # exactly SMALL_ARRAY_BYTES: a frame of its own
    frames = [bytearray(f) for f in encode(ForwardBackwardResult(lengths=large, logprobs=np.zeros(3),
                                                                elementwise_loss=np.ones(5, np.float32)))]
    assert len(frames) == 3
    out = decode(frames)
    assert np.shares_memory(out.lengths, np.frombuffer(frames[2], np.uint8))
    for small in (out.logprobs, out.elementwise_loss):
        assert np.shares_memory(small, np.frombuffer(frames[1], np.uint8)) and small.ctypes.data % 8 == 0


def test_many_small_arrays_share_one_frame_and_large_ones_travel_alone():
    """An adapter's tensors: one frame for all of them, not one each (a frame costs more than copying them)."""
    rng = np.random.default_rng(0)
    tensors = {f"layer{i}.lora_A": rng.random((8, 256), np.float32) for i in range(58)}
    tensors["lm_head.lora_B"] = rng.random((SMALL_ARRAY_BYTES // 32 + 1, 8), np.float32)  # just over the line
    frames = encode(EngineLoadAdapterReq(adapter_id="a", lora=LoraSpec(rank=8), tensors=tensors))
    assert len(frames) == 1 + 1 + 1
    out = decode([bytes(f) for f in frames])
    assert list(out.tensors) == list(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(out.tensors[name], value)
    assert len(encode(ErrorResp(detail="no arrays"))) == 1


def test_a_message_missing_its_array_frames_is_refused():
    frames = encode(ForwardBackwardResult(lengths=np.arange(SMALL_ARRAY_BYTES), logprobs=np.zeros(2),
                                          elementwise_loss=np.zeros(2)))
    for lost in (frames[:1], frames[:2], [frames[0], frames[1][:8], frames[2]]):
        with pytest.raises(CodecError):
            decode(lost)


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
