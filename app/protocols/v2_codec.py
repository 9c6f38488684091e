"""Open Inference Protocol v2 tensors on the wire, apart from any model.

A v2 inference body is a JSON object. With Triton's binary tensor data extension (what
``tritonclient`` sends by default) the JSON header is followed by raw little-endian, row-major
tensors: the ``Inference-Header-Content-Length`` HTTP header gives the JSON's length, and each
binary input its size in the ``binary_data_size`` parameter, in the order of ``inputs``. Responses
use the same layout for the outputs asked for in binary (``binary_data`` per output, or
``binary_data_output`` for all).

This module turns such a body into NumPy arrays and arrays back into a body, and refuses anything
malformed with a 400 that names the spot. It knows nothing about models, so the HTTP adapter
(``app.protocols.v2``) stays thin and this part is tested on its own against tritonclient's
encoder and decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.errors import ApiError, describe

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "|b1",
        "UINT8": "|u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "|i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
"""The v2 datatypes served here, with their little-endian NumPy dtypes."""

_REFUSED = {
    "BYTES": "BYTES tensors are not supported: the models here take numbers",
    "BF16": "BF16 is not supported; send FP32",
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
_REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
_INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_FIELDS = {"name", "parameters"}
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "the shared memory extension is not supported; send the data in the body",
    "shared_memory_byte_size": "the shared memory extension is not supported; send the data in the body",
    "shared_memory_offset": "the shared memory extension is not supported; send the data in the body",
    "classification": "the classification extension is not supported; ask for the probabilities",
}

Parameters = dict[str, bool | int | float | str]


def bad(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    array: np.ndarray
    """Shaped as the request's ``shape``, in the request's datatype."""


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    """Whether to return it as binary data (its ``binary_data``, else the request's ``binary_data_output``)."""


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: Parameters
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None
    """None when the request names no outputs: every output is returned."""
    binary_output: bool
    """The request's ``binary_data_output``: the default for outputs not named in ``outputs``."""


@dataclass(frozen=True)
class OutputTensor:
    name: str
    array: np.ndarray
    binary: bool


def datatype_of(dtype: np.dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("<")]
    except KeyError:
        raise ValueError(f"no v2 datatype for NumPy {dtype}") from None


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request in ``body``; ``header_length`` is the ``Inference-Header-Content-Length`` header, if any."""
    size = _header_size(header_length, len(body))
    header = _json_object(body if size is None else body[:size], size)
    binary = memoryview(body)[len(body) if size is None else size :]
    unknown = sorted(set(header) - _REQUEST_FIELDS)
    if unknown:
        raise bad(
            f"unknown field {unknown[0]!r} in the inference request; fields: {', '.join(sorted(_REQUEST_FIELDS))}"
        )
    given_null = sorted(key for key, value in header.items() if value is None)
    if given_null:  # absent is fine, null is not what the protocol allows
        raise bad(f"{given_null[0]}: null is not allowed; leave the field out instead")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad(f"id: expected a string, got {_describe(request_id)}")
    parameters = _parameters(header.get("parameters"), "parameters")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise bad(f"parameters.binary_data_output: expected true or false, got {_describe(binary_output)}")

    specs = header.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise bad(f"inputs: expected a non-empty array of input tensors, got {_describe(specs)}")
    inputs, offset = [], 0
    for index, spec in enumerate(specs):
        tensor, used = _input(spec, f"inputs[{index}]", binary[offset:], has_header_length=size is not None)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise bad(
            f"the body has {len(binary) - offset} bytes after the JSON header and the inputs' binary data "
            f"(binary_data_size adds up to {offset}); check {HEADER_LENGTH} and binary_data_size"
        )
    names = [tensor.name for tensor in inputs]
    if len(set(names)) != len(names):
        raise bad(f"inputs: input {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return InferRequest(request_id, parameters, inputs, _outputs(header.get("outputs"), binary_output), binary_output)


def encode_infer_response(header: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length if any output is binary (else None: all JSON)."""
    tensors, chunks = [], []
    for output in outputs:
        array = np.ascontiguousarray(output.array)
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if output.binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = array.reshape(-1)
        tensors.append(tensor)
    head = orjson.dumps({**header, "outputs": tensors}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _header_size(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise bad(f"{HEADER_LENGTH}: expected the JSON header's length in bytes, got {value!r}")
    size = int(text)
    if size > body_size:
        raise bad(f"{HEADER_LENGTH} is {size} but the body has only {body_size} bytes")
    return size


def _json_object(text: bytes, header_size: int | None) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        where = (
            "request body"
            if header_size is None
            else f"JSON header (the first {header_size} bytes, per {HEADER_LENGTH})"
        )
        raise bad(f"{where} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise bad(f"the inference request must be a JSON object, got {_describe(value)}")
    return value


def _parameters(value: Any, where: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{where}: expected an object, got {_describe(value)}")
    for key, item in value.items():
        if key in _UNSUPPORTED_PARAMETERS:
            raise bad(f"{where}.{key}: {_UNSUPPORTED_PARAMETERS[key]}")
        if not isinstance(item, bool | int | float | str):
            raise bad(f"{where}.{key}: a parameter is a string, number or boolean, got {_describe(item)}")
    return value


def _input(spec: Any, where: str, rest: memoryview, has_header_length: bool) -> tuple[InputTensor, int]:
    """One input tensor, and how many bytes of ``rest`` (the binary data not yet claimed) it used."""
    if not isinstance(spec, dict):
        raise bad(f"{where}: expected an input tensor object, got {_describe(spec)}")
    unknown = sorted(set(spec) - _INPUT_FIELDS)
    if unknown:
        raise bad(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(sorted(_INPUT_FIELDS))}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise bad(f"{where}.name: expected a string, got {_describe(name)}")
    where = f"{where} ({name!r})"
    dtype, datatype = _datatype(spec.get("datatype"), where)
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"{where}.shape: expected an array of non-negative integers, got {_describe(shape)}")
    count = math.prod(shape)
    parameters = _parameters(spec.get("parameters"), f"{where}.parameters")  # others' (content_type): no effect
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise bad(f"{where}: no data (give 'data', or binary data with parameters.binary_data_size)")
        return InputTensor(name, datatype, _from_json(spec["data"], dtype, datatype, shape, count, where)), 0
    if "data" in spec:
        raise bad(f"{where}: both 'data' and parameters.binary_data_size are given; send one")
    if type(size) is not int or size < 0:
        raise bad(f"{where}.parameters.binary_data_size: expected a non-negative integer, got {_describe(size)}")
    if not has_header_length:
        raise bad(f"{where} has binary_data_size but the request has no {HEADER_LENGTH} header")
    expected = count * dtype.itemsize
    if size != expected:
        raise bad(f"{where}: binary_data_size is {size} but shape {shape} of {datatype} takes {expected} bytes")
    if size > len(rest):
        raise bad(f"{where}: binary_data_size is {size} but only {len(rest)} bytes of binary data remain in the body")
    array = np.frombuffer(rest[:size], dtype).reshape(shape)
    if datatype == "BOOL" and (array.view(np.uint8) > 1).any():
        raise bad(f"{where}: BOOL binary data must be bytes 0 or 1")
    return InputTensor(name, datatype, array), size


def _datatype(value: Any, where: str) -> tuple[np.dtype, str]:
    if not isinstance(value, str):
        raise bad(f"{where}.datatype: expected one of {', '.join(DATATYPES)}, got {_describe(value)}")
    if value in _REFUSED:
        raise bad(f"{where}.datatype: {_REFUSED[value]}")
    if value not in DATATYPES:
        raise bad(f"{where}.datatype: expected one of {', '.join(DATATYPES)}, got {_describe(value)}")
    return DATATYPES[value], value


def _from_json(data: Any, dtype: np.dtype, datatype: str, shape: list[int], count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]  # a scalar tensor may be given as a bare value
    leaves = _flatten(data)
    if len(leaves) != count:
        raise bad(f"{where}.data: {len(leaves)} values, but shape {shape} holds {count}")
    if datatype == "BOOL":
        wanted, allowed = "true or false", {bool}
    elif dtype.kind in "iu":
        wanted, allowed = "an integer", {int}
    else:
        wanted, allowed = "a number", {int, float}
    if not set(map(type, leaves)) <= allowed:  # one pass in C; the loop below only names the culprit
        index, value = next((i, v) for i, v in enumerate(leaves) if type(v) not in allowed)
        raise bad(f"{where}.data: value {index} (row-major): expected {wanted} for {datatype}, got {_describe(value)}")
    try:
        with np.errstate(over="ignore"):  # float overflow becomes infinity, refused below
            array = np.array(leaves, dtype=dtype).reshape(shape)
    except OverflowError:
        info = np.iinfo(dtype)
        first = next(i for i, v in enumerate(leaves) if not info.min <= v <= info.max)
        raise bad(f"{where}.data: value {first} (row-major) is outside the {datatype} range") from None
    if dtype.kind == "f" and not np.isfinite(array).all():  # JSON has no NaN or infinity: an overflow
        first = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        raise bad(f"{where}.data: value {first} (row-major) is outside the {datatype} range")
    return array


def _flatten(data: list) -> list:
    """Nested arrays to their row-major leaves (v2 allows flat or nested ``data``)."""
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _outputs(value: Any, binary_output: bool) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad(f"outputs: expected an array of requested outputs, got {_describe(value)}")
    outputs = []
    for index, spec in enumerate(value):
        where = f"outputs[{index}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad(f"{where}: expected an object with a string 'name', got {_describe(spec)}")
        unknown = sorted(set(spec) - _OUTPUT_FIELDS)
        if unknown:
            raise bad(f"{where}: unknown field {unknown[0]!r}; fields: name, parameters")
        parameters = _parameters(spec.get("parameters"), f"{where}.parameters")
        binary = parameters.get("binary_data", binary_output)
        if not isinstance(binary, bool):
            raise bad(f"{where}.parameters.binary_data: expected true or false, got {_describe(binary)}")
        if any(o.name == spec["name"] for o in outputs):
            raise bad(f"{where}: output {spec['name']!r} is asked for twice")
        outputs.append(RequestedOutput(spec["name"], binary))
    return outputs


def _describe(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode() if isinstance(value, list | dict) else repr(value)
    except TypeError:  # nested deeper than orjson writes
        text = describe(value).partition(" ")[2]
    kind = {list: "array", dict: "object", str: "string", bool: "boolean", type(None): "null"}
    return f"{kind.get(type(value), type(value).__name__)} {text if len(text) <= 40 else text[:37] + '...'}"
