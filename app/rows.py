"""Request rows to the float32 batch a model takes: the one path for every door, JSON or typed.

Rows come as the JSON list of instances (native and TF Serving row format) or as a typed NumPy
array (v2 tensors, binary or JSON, and gRPC contents). Either becomes ``[N, *input_shape]`` float32,
finite, at most ``max_instances`` rows, or a 422 whose message names the spot (``where`` says how
the request calls the rows: ``instances``, ``input 'inputs'``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.errors import ApiError

_NUMBER_TYPES = (int, float)


def to_batch(
    rows: np.ndarray | list[Any], shape: tuple[int, ...], max_instances: int, where: str, booleans: bool, owner: str
) -> np.ndarray:
    """The float32 batch of ``rows`` for input ``shape``; ``owner`` names the model in shape errors."""
    if isinstance(rows, np.ndarray):
        return _typed(rows, shape, max_instances, where, owner)
    check_count(len(rows), max_instances, where)
    if not booleans:
        try:
            batch = np.array(rows)
        except (ValueError, RecursionError):  # ragged, or nested deeper than NumPy goes
            batch = None
        if batch is not None and batch.dtype.kind in "iuf" and batch.shape[1:] == shape and len(rows):
            return _finite_float32(batch, where)
    for index, instance in enumerate(rows):
        _check(instance, shape, f"{where}[{index}]")
    return _finite_float32(np.asarray(rows, dtype=np.float64), where)


def check_count(count: int, max_instances: int, where: str) -> None:
    if count > max_instances:
        raise ApiError(
            422, f"{where}: {count} given, at most {max_instances} per request (DROPOUT_SERVE_MAX_INSTANCES)"
        )


def _typed(array: np.ndarray, shape: tuple[int, ...], max_instances: int, where: str, owner: str) -> np.ndarray:
    expected = [-1, *shape]
    if array.ndim != len(expected) or array.shape[1:] != shape or array.shape[0] == 0:
        raise ApiError(422, f"{where}: shape {list(array.shape)} does not match {expected} of {owner} (N >= 1 rows)")
    check_count(array.shape[0], max_instances, where)
    if array.dtype.kind not in "iuf":
        raise ApiError(422, f"{where}: datatype {_datatype(array)}; send numbers (FP32, FP64, INT*, UINT*)")
    if array.dtype == np.float32:
        batch = array
    else:
        with np.errstate(over="ignore"):
            batch = array.astype(np.float32)
    if array.dtype.kind == "f" and not np.isfinite(batch).all():
        position = [int(i) for i in np.argwhere(~np.isfinite(batch))[0]]
        raise ApiError(422, f"{where}: value at {position} is NaN, infinite or beyond float32's range")
    return batch


def _datatype(array: np.ndarray) -> str:
    return "BOOL" if array.dtype.kind == "b" else str(array.dtype)


def _finite_float32(values: np.ndarray, where: str) -> np.ndarray:
    batch = values.astype(np.float32)
    if values.dtype.kind in "iu":  # every int64 is finite in float32 (2^63 < float32's largest)
        return batch
    if not np.isfinite(batch).all():
        spot = np.argwhere(~np.isfinite(batch))[0]
        position = "".join(f"[{i}]" for i in spot)
        if np.isfinite(values[tuple(spot)]):
            raise ApiError(422, f"{where}{position}: value is outside the float32 range")
        raise ApiError(422, f"{where}{position}: NaN and infinity are not allowed")
    return batch


def _check(value: Any, shape: tuple[int, ...], where: str) -> None:
    if not shape:
        if type(value) not in _NUMBER_TYPES:
            raise ApiError(422, f"{where}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ApiError(422, f"{where}: NaN and infinity are not allowed")
        return
    if not isinstance(value, list) or len(value) != shape[0]:
        got = f"a list of {len(value)}" if isinstance(value, list) else _describe(value)
        raise ApiError(422, f"{where}: expected a list of {shape[0]} (instance shape {list(shape)}), got {got}")
    for index, item in enumerate(value):
        _check(item, shape[1:], f"{where}[{index}]")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
