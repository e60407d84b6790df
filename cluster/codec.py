"""Message <-> ZMQ frames: msgpack header first; then, if the message holds numpy arrays, one
frame holding every small array and one raw frame per large array.

A large array is never copied: `encode` hands its buffer to ZMQ as is. Arrays under
SMALL_ARRAY_BYTES are copied once, side by side, into the second frame, since a frame costs
more to send and receive than such a copy. `decode` wraps the frames with `np.frombuffer`
(read-only views, zero-copy). Nothing is pickled; an unknown message tag is an error, not
a guess.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any, Sequence

import msgpack
import numpy as np

from cluster.messages import MESSAGE_TYPES

_EXT_ARRAY = 1
_EXT_MESSAGE = 2
_EXT_SMALL_ARRAY = 3

# A frame costs ~20-40 us to send and receive, memcpy moves 128 KiB in ~10-20: the built-in model's
# rank-32 adapter (58 tensors of 32-116 KiB) took 2.4-3.5 ms from encode to decode as 58 frames,
# 1.8 ms with the ones under 64 KiB in one frame, 1.3-1.6 ms with all of them (one process, ipc socket).
SMALL_ARRAY_BYTES = 128 * 1024
_SMALL_ALIGN = 64  # each small array starts at a multiple of this in its frame: aligned for any dtype
_SMALL_FRAME, _FIRST_LARGE_FRAME = 1, 2  # where the frames after the header sit


class CodecError(ValueError):
    pass


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _message_fields(cls: type) -> tuple[str, ...] | None:
    """The field names of a registered message class (None for anything else), looked up once per
    class: dataclasses.fields() on every object was a third of an encode."""
    try:
        return _FIELD_NAMES[cls]
    except KeyError:
        is_message = dataclasses.is_dataclass(cls) and MESSAGE_TYPES.get(cls.__name__) is cls
        names = tuple(f.name for f in dataclasses.fields(cls)) if is_message else None
        return _FIELD_NAMES.setdefault(cls, names)


def encode(msg: Any) -> list:
    """Return `[header]` or `[header, small_arrays, *large_arrays]`, ready for `send_multipart(copy=False)`."""
    arrays: list[np.ndarray] = []
    small: list = []  # the small arrays' frame, in pieces: (padding, bytes) pairs
    small_end = 0

    def default(obj):
        nonlocal small_end
        if isinstance(obj, np.ndarray):
            arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)  # (which makes 0-d arrays 1-d)
            if arr.dtype.hasobject:
                raise CodecError("object arrays cannot travel as frames")
            if arr.nbytes < SMALL_ARRAY_BYTES:
                offset = (small_end + _SMALL_ALIGN - 1) // _SMALL_ALIGN * _SMALL_ALIGN
                small.extend((bytes(offset - small_end), memoryview(arr).cast("B") if arr.size else b""))
                small_end = offset + arr.nbytes
                return msgpack.ExtType(_EXT_SMALL_ARRAY, msgpack.packb([offset, arr.dtype.str, list(arr.shape)]))
            arrays.append(arr)
            return msgpack.ExtType(_EXT_ARRAY, msgpack.packb([len(arrays) - 1, arr.dtype.str, list(arr.shape)]))
        names = _message_fields(type(obj))
        if names is not None:
            fields = {name: getattr(obj, name) for name in names}
            return msgpack.ExtType(_EXT_MESSAGE, msgpack.packb([type(obj).__name__, fields], default=default))
        if isinstance(obj, np.generic):
            return obj.item()
        raise CodecError(f"cannot encode {type(obj).__name__}")

    header = msgpack.packb(msg, default=default)
    if not (arrays or small):
        return [header]
    return [header, b"".join(small), *(memoryview(a).cast("B") for a in arrays)]


def peek_header(frames: Sequence) -> tuple[str, int] | None:
    """(message type name, call_id) of a message `decode` refused, if its header still
    says them: so the receiver can answer the request, or fail the call waiting for
    that reply, instead of dropping it and leaving someone waiting forever."""
    def lenient_ext_hook(code: int, data: bytes):
        if code == _EXT_MESSAGE:
            return msgpack.unpackb(data, ext_hook=lenient_ext_hook, strict_map_key=False)
        return None

    try:
        first = frames[0]
        outer = msgpack.unpackb(first.buffer if hasattr(first, "buffer") else first,
                                ext_hook=lenient_ext_hook, strict_map_key=False)
        name, fields = outer
        call_id = fields["call_id"]
    except Exception:
        return None
    if not isinstance(name, str) or not isinstance(call_id, int):
        return None
    return name, call_id


def decode(frames: Sequence) -> Any:
    """Inverse of `encode`; frames may be bytes or zmq.Frame objects."""
    buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    small = memoryview(buffers[_SMALL_FRAME]) if len(buffers) > _SMALL_FRAME else memoryview(b"")

    def ext_hook(code: int, data: bytes):
        if code == _EXT_ARRAY:
            index, dtype, shape = msgpack.unpackb(data)
            if _FIRST_LARGE_FRAME + index >= len(buffers):
                raise CodecError(f"array frame {index} missing")
            arr = np.frombuffer(buffers[_FIRST_LARGE_FRAME + index], dtype=np.dtype(dtype))
            return arr.reshape(tuple(shape))
        if code == _EXT_SMALL_ARRAY:
            offset, dtype, shape = msgpack.unpackb(data)
            dtype, count = np.dtype(dtype), math.prod(shape)
            if offset + count * dtype.itemsize > small.nbytes:
                raise CodecError("small-array frame missing or short")
            return np.frombuffer(small, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
        if code == _EXT_MESSAGE:
            name, fields = msgpack.unpackb(data, ext_hook=ext_hook, strict_map_key=False)
            cls = MESSAGE_TYPES.get(name)
            if cls is None:
                raise CodecError(f"unknown message type {name!r}")
            return cls(**fields)
        raise CodecError(f"unknown ext code {code}")

    return msgpack.unpackb(buffers[0], ext_hook=ext_hook, strict_map_key=False)


_BLOB_COUNT = struct.Struct("<I")
_BLOB_LENGTH = struct.Struct("<Q")


def encode_blob(msg: Any) -> bytes:
    """`encode` as one bytes object (to store a message, e.g. a future's result, in SQLite).

    Layout: frame count (u32 LE), then per frame its length (u64 LE) and its bytes.
    """
    frames = encode(msg)
    parts = [_BLOB_COUNT.pack(len(frames))]
    for frame in frames:
        view = memoryview(frame).cast("B")
        parts += [_BLOB_LENGTH.pack(view.nbytes), view]
    return b"".join(parts)


def decode_blob(blob: bytes) -> Any:
    """Inverse of `encode_blob`; arrays are views into `blob`."""
    view = memoryview(blob)
    if len(view) < _BLOB_COUNT.size:
        raise CodecError("blob too short")
    (count,), pos = _BLOB_COUNT.unpack_from(view, 0), _BLOB_COUNT.size
    frames = []
    for _ in range(count):
        if pos + _BLOB_LENGTH.size > len(view):
            raise CodecError("blob truncated in a frame length")
        (length,) = _BLOB_LENGTH.unpack_from(view, pos)
        pos += _BLOB_LENGTH.size
        if pos + length > len(view):
            raise CodecError("blob truncated in a frame")
        frames.append(view[pos:pos + length])
        pos += length
    if pos != len(view):
        raise CodecError(f"{len(view) - pos} stray bytes after the last frame")
    return decode(frames)
