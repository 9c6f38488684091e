"""app/grpc/tensors.py: gRPC tensors read and written as the peers' own clients build them."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from app.errors import ApiError
from app.grpc import tensors


def triton_request(*inputs: grpcclient.InferInput, parameters: dict | None = None) -> service_pb2.ModelInferRequest:
    """The ModelInferRequest tritonclient itself sends (its own request builder)."""
    from tritonclient.grpc._utils import _get_inference_request

    return _get_inference_request(
        model_name="m",
        inputs=list(inputs),
        model_version="",
        request_id="",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=parameters,
    )


def test_raw_contents_from_tritonclient_read_back_exactly():
    rows = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    x = grpcclient.InferInput("inputs", [3, 4], "FP32")
    x.set_data_from_numpy(rows)
    (tensor,) = tensors.v2_inputs(triton_request(x))
    assert (tensor.name, tensor.datatype) == ("inputs", "FP32")
    np.testing.assert_array_equal(tensor.array, rows)


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [1.5, -2.0], np.float64),
        ("INT32", "int_contents", [7, -3], np.int32),
        ("INT64", "int64_contents", [2**40, -1], np.int64),
        ("UINT8", "uint_contents", [0, 255], np.uint8),
    ],
)
def test_typed_contents_take_their_datatype(datatype, field, values, dtype):
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="inputs", datatype=datatype, shape=[1, 2])
    getattr(tensor.contents, field).extend(values)
    (read,) = tensors.v2_inputs(request)
    assert read.array.dtype == dtype and read.array.shape == (1, 2)
    np.testing.assert_array_equal(read.array, np.array([values], dtype))


def bad_request(message: str, build) -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    build(request)
    with pytest.raises(ApiError) as caught:
        tensors.v2_inputs(request)
    assert caught.value.status == 400
    assert message in caught.value.message


def test_bad_tensors_name_the_spot():
    def short(request):
        request.inputs.add(name="inputs", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1.0, 2.0])

    bad_request("inputs[0] ('inputs').contents.fp32_contents: 2 values, but shape [1, 3] holds 3", short)

    def raw_short(request):
        request.inputs.add(name="inputs", datatype="FP32", shape=[2, 2])
        request.raw_input_contents.append(b"\0" * 12)

    bad_request("inputs[0] ('inputs'): raw_input_contents has 12 bytes but shape [2, 2] of FP32 takes 16", raw_short)

    def words(request):
        request.inputs.add(name="inputs", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")

    bad_request("inputs[0] ('inputs').datatype: 'BYTES' is not served", words)

    def half_typed(request):
        request.inputs.add(name="inputs", datatype="FP16", shape=[1])

    bad_request("FP16 has no typed contents field; send it in raw_input_contents", half_typed)

    def both(request):
        tensor = request.inputs.add(name="inputs", datatype="FP32", shape=[1])
        tensor.contents.fp32_contents.append(1.0)
        request.raw_input_contents.append(b"\0" * 4)

    bad_request("both contents and raw_input_contents are given", both)

    def overflow(request):
        request.inputs.add(name="inputs", datatype="INT8", shape=[1]).contents.int_contents.append(300)

    bad_request("a value is outside the INT8 range", overflow)

    def shared(request):
        tensor = request.inputs.add(name="inputs", datatype="FP32", shape=[1])
        tensor.parameters["shared_memory_region"].string_param = "region"

    bad_request("inputs[0] ('inputs').parameters: the shared memory extension is not supported", shared)

    def twice(request):
        for _ in range(2):
            request.inputs.add(name="inputs", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)

    bad_request("input 'inputs' is given twice", twice)


def test_parameters_as_tritonclient_sends_them():
    x = grpcclient.InferInput("inputs", [1], "FP32")
    x.set_data_from_numpy(np.zeros(1, np.float32))
    request = triton_request(x, parameters={"mc_dropout": True, "samples": 30, "seed": 2**62, "note": "a"})
    assert tensors.v2_parameters(request.parameters) == {"mc_dropout": True, "samples": 30, "seed": 2**62, "note": "a"}


def test_outputs_go_back_raw_and_tritonclient_reads_them():
    probabilities = np.random.default_rng(1).random((2, 10)).astype(np.float32)
    entropy = np.random.default_rng(2).random(2)
    response = service_pb2.ModelInferResponse(model_name="m", model_version="1")
    tensors.v2_outputs(response, [("probabilities", probabilities), ("predictive_entropy", entropy)])
    result = grpcclient.InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("predictive_entropy"), entropy)
    assert [o.datatype for o in response.outputs] == ["FP32", "FP64"]


def test_tensor_protos_round_trip_and_refuse_strings():
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(tensors.from_tensor_proto(tensors.to_tensor_proto(rows), "inputs"), rows)
    with pytest.raises(ApiError) as caught:
        tensors.from_tensor_proto(tf.make_tensor_proto(["a", "b"]), "inputs['inputs']")
    assert caught.value.status == 400
    assert "inputs['inputs']: expected numbers, got a string tensor" in caught.value.message
