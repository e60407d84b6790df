"""Tinker tensors (protobuf `Tensor` and JSON `TensorData`) to and from numpy.

Both forms are either dense (row-major values) or sparse CSR (values, crow_indices,
col_indices, with the dense shape required); cells CSR leaves out are 0, or -1 for
`target_prompt_logprobs`. The SDK switches 2-D `target_tokens` / `weights` to CSR by
itself whenever that is smaller, so every loss input may arrive either way. `where`
names the tensor in errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from api import proto
from api.errors import bad_request
from api.json_fields import JsonObject

_NUMPY_BY_PROTO_DTYPE = {
    proto.DType.DTYPE_FLOAT32: np.dtype("<f4"),
    proto.DType.DTYPE_INT64: np.dtype("<i8"),
}
_NUMPY_BY_JSON_DTYPE = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}


def tensor_from_proto(msg, where: str) -> np.ndarray:
    dtype = _NUMPY_BY_PROTO_DTYPE.get(msg.dtype)
    if dtype is None:
        raise bad_request(f"{where} has dtype {_proto_dtype_name(msg.dtype)}; requests may use "
                          "DTYPE_FLOAT32 or DTYPE_INT64")
    shape = _checked_shape([int(n) for n in msg.shape], where)
    encoding = msg.WhichOneof("encoding")
    if encoding == "sparse_csr":
        csr = msg.sparse_csr
        return _densify_csr(_frombuffer(csr.values, dtype, f"{where} values"),
                            _frombuffer(csr.crow_indices, np.dtype("<i8"), f"{where} crow_indices"),
                            _frombuffer(csr.col_indices, np.dtype("<i8"), f"{where} col_indices"), shape, where)
    values = _frombuffer(msg.dense, dtype, where)  # an unset oneof reads as empty bytes: an empty tensor
    return _reshape(values, shape, where)


def tensor_from_json(obj: JsonObject) -> np.ndarray:
    values, shape, csr = _json_tensor_parts(obj)
    if csr is None:
        return _reshape(values, shape or [], obj.where)
    return _densify_csr(values, *csr, shape, obj.where)


def tensor_and_listed_cells_from_json(obj: JsonObject, pad_value: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(dense array, bool mask of the cells a CSR tensor lists, or None for a dense one).

    With the mask a result can go back in the request's own CSR layout, so only
    canonical CSR is accepted here: each row's columns strictly increasing, as torch
    writes it. Unlisted cells are `pad_value`.
    """
    values, shape, csr = _json_tensor_parts(obj)
    if csr is None:
        return _reshape(values, shape or [], obj.where), None
    dense = _densify_csr(values, *csr, shape, obj.where, pad_value)
    crow, col = csr
    row_of = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    if np.any((row_of[1:] == row_of[:-1]) & (col[1:] <= col[:-1])):
        raise bad_request(f"{obj.where}: col_indices must increase strictly within each row (canonical CSR)")
    return dense, _densify_csr(np.ones(len(values), dtype=bool), crow, col, shape, obj.where, False)


def _json_tensor_parts(obj: JsonObject) -> tuple[np.ndarray, list[int] | None, tuple[np.ndarray, np.ndarray] | None]:
    """(values, shape or None, (crow_indices, col_indices) or None for a dense tensor)."""
    where = obj.where
    dtype_name = obj.get_str("dtype")
    dtype = _NUMPY_BY_JSON_DTYPE.get(dtype_name)
    if dtype is None:
        raise bad_request(f"{where}.dtype must be 'float32' or 'int64', got {dtype_name!r}")
    values = _json_numbers(obj.get_list("data"), dtype, f"{where}.data")
    shape = _checked_shape(obj.get_list("shape", []), where) or None
    if not (obj.has("sparse_crow_indices") or obj.has("sparse_col_indices")):
        return values, shape, None
    if shape is None:
        raise bad_request(f"{where} is sparse CSR, so it needs a shape")
    crow = _json_numbers(obj.get_list("sparse_crow_indices"), np.dtype(np.int64), f"{where}.sparse_crow_indices")
    col = _json_numbers(obj.get_list("sparse_col_indices"), np.dtype(np.int64), f"{where}.sparse_col_indices")
    return values, shape, (crow, col)


def tensor_data_json(array: np.ndarray, listed: np.ndarray | None = None) -> dict[str, Any]:
    """An array as JSON TensorData (float32 or int64), CSR of the `listed` cells if given; NaN becomes null."""
    dtype = "float32" if np.issubdtype(array.dtype, np.floating) else "int64"
    if listed is None:
        flat = array.reshape(-1).astype(dtype)
        return {"data": nan_to_none(flat), "dtype": dtype, "shape": list(array.shape)}
    values, crow, col = _csr_parts(array, listed)
    return {"data": nan_to_none(values.astype(dtype)), "dtype": dtype, "shape": list(array.shape),
            "sparse_crow_indices": crow.tolist(), "sparse_col_indices": col.tolist()}


def tensor_proto(array: np.ndarray, listed: np.ndarray | None = None):
    """A float32 or int64 array as a protobuf Tensor: dense, or CSR of the `listed` cells if given."""
    dtype = proto.DType.DTYPE_FLOAT32 if np.issubdtype(array.dtype, np.floating) else proto.DType.DTYPE_INT64
    numpy_dtype = _NUMPY_BY_PROTO_DTYPE[dtype]
    msg = proto.Tensor(dtype=dtype, shape=list(array.shape))
    if listed is None:
        msg.dense = np.ascontiguousarray(array, dtype=numpy_dtype).tobytes()
    else:
        values, crow, col = _csr_parts(array, listed)
        msg.sparse_csr.values = values.astype(numpy_dtype).tobytes()
        msg.sparse_csr.crow_indices = crow.astype("<i8").tobytes()
        msg.sparse_csr.col_indices = col.astype("<i8").tobytes()
    return msg


def _csr_parts(array: np.ndarray, listed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, crow_indices, col_indices) of the `listed` cells of a 2-D array, rows in order."""
    rows, cols = np.nonzero(listed)
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=array.shape[0]))])
    return array[rows, cols], crow, cols


def nan_to_none(values: np.ndarray) -> list:
    """`values.tolist()` with every NaN as None (JSON has no NaN)."""
    result = values.tolist()
    if np.issubdtype(values.dtype, np.floating):
        for i in np.flatnonzero(np.isnan(values)):
            result[i] = None
    return result


def _frombuffer(raw: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise bad_request(f"{where} holds {len(raw)} bytes, not a whole number of {dtype.itemsize}-byte values")
    return np.frombuffer(raw, dtype=dtype)


def _json_numbers(values: list, dtype: np.dtype, where: str) -> np.ndarray:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise bad_request(f"{where} must be a flat array of numbers")
    if dtype.kind == "i" and not all(isinstance(v, int) or float(v).is_integer() for v in values):
        raise bad_request(f"{where} must hold integers (dtype int64)")
    try:
        return np.asarray(values, dtype=dtype)
    except OverflowError:
        raise bad_request(f"{where} has a value out of the int64 range") from None


def _proto_dtype_name(value: int) -> str:
    try:
        return proto.DType(value).name
    except ValueError:
        return str(value)


def _checked_shape(shape: list, where: str) -> list[int]:
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise bad_request(f"{where}: shape must be a list of non-negative integers, got {shape}")
    return shape


def _reshape(values: np.ndarray, shape: list[int], where: str) -> np.ndarray:
    if not shape:  # no shape given: a 1-D tensor
        return values
    if int(np.prod(shape)) != values.size:
        raise bad_request(f"{where} has {values.size} values, which does not fit its shape {shape}")
    return values.reshape(shape)


def _densify_csr(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int],
                 where: str, pad_value=0) -> np.ndarray:
    if len(shape) != 2:
        raise bad_request(f"{where} is sparse CSR, so its shape must have 2 dimensions, got {shape}")
    rows, cols = shape
    nnz = len(values)
    if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != nnz or np.any(np.diff(crow) < 0):
        raise bad_request(f"{where}: crow_indices must be {rows + 1} non-decreasing row pointers from 0 "
                          f"to the number of values ({nnz})")
    if len(col) != nnz or (nnz and (col.min() < 0 or col.max() >= cols)):
        raise bad_request(f"{where}: col_indices must hold one column in [0, {cols}) per value")
    dense = np.full((rows, cols), pad_value, dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense
