"""Tensors in and out of the gRPC messages: the Open Inference Protocol's and TensorFlow's ``TensorProto``.

v2 inputs come typed (``contents.fp32_contents``...) or as little-endian bytes in
``raw_input_contents`` (tritonclient's way), never both; they become the same
``v2_codec.InputTensor`` the REST door reads, so both doors check them alike. Outputs always go
back as ``raw_output_contents``, as Triton answers gRPC. TF Serving's tensors are read and written by
TensorFlow's own ``make_ndarray`` / ``make_tensor_proto``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tritonclient.grpc import service_pb2

from app.errors import ApiError
from app.protocols import v2_codec as codec

CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
"""Where each datatype's values go in ``InferTensorContents`` (FP16 only travels raw)."""


def bad(message: str) -> ApiError:
    return ApiError(400, message)


def v2_parameters(parameters: Mapping[str, service_pb2.InferParameter]) -> codec.Parameters:
    """``map<string, InferParameter>`` as the REST door's JSON ``parameters`` object."""
    values: codec.Parameters = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise bad(f"parameters.{key}: no value set")
        values[key] = getattr(parameter, choice)
    return values


def set_v2_parameters(target: MutableMapping[str, service_pb2.InferParameter], values: Mapping[str, Any]) -> None:
    """Plain response parameters (the REST door's JSON ``parameters``) as ``InferParameter`` values."""
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = str(value)


def v2_inputs(request: service_pb2.ModelInferRequest) -> list[codec.InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one per input")
    if not request.inputs:
        raise bad("inputs: expected at least one input tensor")
    inputs = [
        _v2_input(tensor, f"inputs[{i}] ({tensor.name!r})", raw[i] if raw else None)
        for i, tensor in enumerate(request.inputs)
    ]
    names = [tensor.name for tensor in inputs]
    if len(set(names)) != len(names):
        raise bad(f"inputs: input {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return inputs


def _v2_input(
    tensor: service_pb2.ModelInferRequest.InferInputTensor, where: str, raw: bytes | None
) -> codec.InputTensor:
    datatype = tensor.datatype
    if datatype not in codec.DATATYPES:
        raise bad(f"{where}.datatype: {datatype!r} is not served; the models here take {', '.join(codec.DATATYPES)}")
    dtype = codec.DATATYPES[datatype]
    if any(key.startswith("shared_memory") for key in tensor.parameters):
        raise bad(f"{where}.parameters: the shared memory extension is not supported; send the data in the message")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise bad(f"{where}.shape: expected non-negative dimensions, got {shape}")
    count = math.prod(shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise bad(f"{where}: both contents and raw_input_contents are given; send one")
        if len(raw) != (size := count * dtype.itemsize):
            raise bad(f"{where}: raw_input_contents has {len(raw)} bytes but shape {shape} of {datatype} takes {size}")
        return codec.InputTensor(tensor.name, datatype, np.frombuffer(raw, dtype).reshape(shape))
    field = CONTENTS.get(datatype)
    if field is None:
        raise bad(f"{where}: {datatype} has no typed contents field; send it in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise bad(f"{where}.contents.{field}: {len(values)} values, but shape {shape} holds {count}")
    try:
        array = np.array(values, dtype)
    except OverflowError:
        raise bad(f"{where}.contents.{field}: a value is outside the {datatype} range") from None
    return codec.InputTensor(tensor.name, datatype, array.reshape(shape))


def v2_outputs(
    response: service_pb2.ModelInferResponse, outputs: Sequence[tuple[str, np.ndarray]]
) -> service_pb2.ModelInferResponse:
    """Add ``outputs`` (name, array) to ``response`` as tensors with raw little-endian contents."""
    for name, value in outputs:
        array = np.ascontiguousarray(value)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        response.outputs.add(name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def from_tensor_proto(proto: tensor_pb2.TensorProto, where: str) -> np.ndarray:
    """A numeric ``TensorProto`` as an array, or INVALID_ARGUMENT naming ``where``."""
    try:
        array = tf.make_ndarray(proto)
    except (TypeError, ValueError) as error:
        raise bad(f"{where}: not a readable tensor: {error}") from None
    if array.dtype.kind not in "biuf":
        raise bad(f"{where}: expected numbers, got a {tf.dtypes.as_dtype(proto.dtype).name} tensor")
    return array


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    return tf.make_tensor_proto(np.ascontiguousarray(array))
