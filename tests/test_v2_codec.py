"""The v2 wire codec against tritonclient's own request encoder and response decoder."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from app.errors import ApiError
from app.protocols.body import decompress
from app.protocols.v2_codec import (
    DATATYPES,
    OutputTensor,
    datatype_of,
    encode_infer_response,
    parse_infer_request,
)


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 1e3).astype(dtype)


def triton_request(arrays: dict[str, np.ndarray], binary: bool = True, **kwargs) -> tuple[bytes, str | None]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), datatype_of(array.dtype))
        inputs.append(tensor.set_data_from_numpy(array, binary_data=binary))
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, **kwargs)
    return body, None if header_length is None else str(header_length)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_datatype_round_trips_from_tritonclient(datatype, binary):
    array = sample(datatype, (3, 4, 2))
    request = parse_infer_request(*triton_request({"x": array}, binary=binary))
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype) == ("x", datatype)
    assert tensor.array.dtype == DATATYPES[datatype] and tensor.array.shape == (3, 4, 2)
    np.testing.assert_array_equal(tensor.array, array)


def test_mixed_inputs_outputs_id_and_parameters():
    first, second = sample("FP32", (2, 64)), sample("INT64", (5,))
    inputs = [
        triton.InferInput("a", [2, 64], "FP32").set_data_from_numpy(first),
        triton.InferInput("b", [5], "INT64").set_data_from_numpy(second, binary_data=False),
        triton.InferInput("c", [1], "FP64").set_data_from_numpy(np.array([0.1])),
    ]
    outputs = [triton.InferRequestedOutput("p"), triton.InferRequestedOutput("q", binary_data=False)]
    body, length = triton.InferenceServerClient.generate_request_body(
        inputs, outputs, request_id="req-7", parameters={"mc_dropout": True, "samples": 30, "seed": 42}
    )
    request = parse_infer_request(body, str(length))
    assert request.id == "req-7"
    assert request.parameters == {"mc_dropout": True, "samples": 30, "seed": 42}
    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    np.testing.assert_array_equal(request.inputs[0].array, first)
    np.testing.assert_array_equal(request.inputs[1].array, second)
    assert request.inputs[2].array.tolist() == [0.1]
    assert [(o.name, o.binary) for o in request.outputs] == [("p", True), ("q", False)]


def test_no_outputs_means_all_in_binary_as_tritonclient_asks():
    request = parse_infer_request(*triton_request({"x": sample("FP32", (1, 3))}))
    assert request.outputs is None and request.binary_output is True


def test_plain_json_with_nested_data_and_output_defaults():
    body = {
        "inputs": [
            {"name": "x", "shape": [2, 2, 2], "datatype": "FP32", "data": [[[1, 2], [3, 4.5]], [[5, 6], [7, 8]]]}
        ],
        "outputs": [{"name": "p"}, {"name": "q", "parameters": {"binary_data": True}}],
    }
    request = parse_infer_request(orjson.dumps(body), None)
    assert request.id is None and request.parameters == {}
    expected = np.array([1, 2, 3, 4.5, 5, 6, 7, 8], np.float32).reshape(2, 2, 2)
    np.testing.assert_array_equal(request.inputs[0].array, expected)
    assert [(o.name, o.binary) for o in request.outputs] == [("p", False), ("q", True)]
    request = parse_infer_request(orjson.dumps({**body, "parameters": {"binary_data_output": True}}), None)
    assert [(o.name, o.binary) for o in request.outputs] == [("p", True), ("q", True)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_response_decodes_with_tritonclient(binary):
    probabilities = np.random.default_rng(1).dirichlet(np.ones(10), 4).astype(np.float32)
    entropy = np.random.default_rng(2).random(4)  # float64
    flags = np.array([True, False, True])
    outputs = [
        OutputTensor("probabilities", probabilities, binary),
        OutputTensor("entropy", entropy, not binary),
        OutputTensor("flags", flags, binary),
        OutputTensor("empty", np.zeros((0, 3), np.float32), binary),
    ]
    body, length = encode_infer_response({"model_name": "m", "model_version": "2", "id": "x"}, outputs)
    assert length is not None
    result = triton.InferResult.from_response_body(body, header_length=length)
    assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "x"
    for output in outputs:
        got = result.as_numpy(output.name)
        assert got.dtype == output.array.dtype and got.shape == output.array.shape
        np.testing.assert_array_equal(got, output.array)
    assert result.get_output("entropy")["datatype"] == "FP64"


def test_all_json_response_is_plain_json():
    array = np.array([[0.1, 0.2]], np.float32)
    body, length = encode_infer_response({"model_name": "m"}, [OutputTensor("outputs", array, False)])
    assert length is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "outputs": [{"name": "outputs", "datatype": "FP32", "shape": [1, 2], "data": [0.1, 0.2]}],
    }
    np.testing.assert_array_equal(triton.InferResult.from_response_body(body).as_numpy("outputs"), array)


def tensor(**fields) -> dict:
    return {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2], **fields}


def json_body(*inputs: dict, **fields) -> tuple[bytes, None]:
    return orjson.dumps({"inputs": list(inputs), **fields}), None


def binary_body(header: dict, data: bytes, length: int | str | None = None) -> tuple[bytes, str]:
    head = orjson.dumps(header)
    return head + data, str(len(head) if length is None else length)


BINARY_X = {"inputs": [tensor(data=None, parameters={"binary_data_size": 8})]}
BINARY_X["inputs"][0].pop("data")

BAD = {
    "not JSON": ((b"{inputs", None), "request body is not valid JSON"),
    "not an object": ((b"[1]", None), "must be a JSON object, got array [1]"),
    "no inputs": (json_body(), "inputs: expected a non-empty array"),
    "unknown field": (json_body(tensor(), input=[]), "unknown field 'input' in the inference request"),
    "id not a string": (json_body(tensor(), id=7), "id: expected a string, got int 7"),
    "unknown datatype": (json_body(tensor(datatype="FLOAT")), "inputs[0] ('x').datatype: expected one of BOOL"),
    "BYTES": (json_body(tensor(datatype="BYTES", data=["a", "b"])), "BYTES tensors are not supported"),
    "bad shape": (json_body(tensor(shape=[1, -2])), "shape: expected an array of non-negative integers"),
    "too few values": (json_body(tensor(data=[1])), "data: 1 values, but shape [1, 2] holds 2"),
    "too many nested": (json_body(tensor(data=[[1, 2], [3]])), "data: 3 values, but shape [1, 2] holds 2"),
    "string value": (
        json_body(tensor(data=[1, "2"])),
        "value 1 (row-major): expected a number for FP32, got string '2'",
    ),
    "bool in FP32": (json_body(tensor(data=[True, 2])), "expected a number for FP32, got boolean True"),
    "float in INT32": (json_body(tensor(datatype="INT32", data=[1, 2.5])), "expected an integer for INT32"),
    "UINT8 overflow": (json_body(tensor(datatype="UINT8", data=[1, 256])), "value 1 (row-major) is outside the UINT8"),
    "FP32 overflow": (json_body(tensor(data=[1e39, 1])), "value 0 (row-major) is outside the FP32 range"),
    "no data": (json_body({"name": "x", "shape": [1], "datatype": "FP32"}), "('x'): no data"),
    "two inputs named alike": (json_body(tensor(), tensor()), "input 'x' is given twice"),
    "shared memory": (
        json_body(tensor(parameters={"shared_memory_region": "r"})),
        "shared memory extension is not supported",
    ),
    "classification": (
        json_body(tensor(), outputs=[{"name": "y", "parameters": {"classification": 3}}]),
        "classification extension is not supported",
    ),
    "output twice": (json_body(tensor(), outputs=[{"name": "y"}, {"name": "y"}]), "output 'y' is asked for twice"),
    "binary_data not bool": (
        json_body(tensor(), outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
        "binary_data: expected true or false, got int 1",
    ),
    "nested parameter": (json_body(tensor(), parameters={"seed": [1]}), "parameters.seed: a parameter is a string"),
    "header length not a number": (binary_body(BINARY_X, bytes(8), "ten"), "expected the JSON header's length"),
    "header length negative": (binary_body(BINARY_X, bytes(8), "-5"), "expected the JSON header's length"),
    "header length past the body": (binary_body(BINARY_X, bytes(8), 10_000), "but the body has only"),
    "header length too short": (binary_body(BINARY_X, bytes(8), 20), "JSON header (the first 20 bytes"),
    "body shorter than declared": (binary_body(BINARY_X, bytes(5)), "only 5 bytes of binary data remain"),
    "size not matching the shape": (
        binary_body({"inputs": [{**BINARY_X["inputs"][0], "parameters": {"binary_data_size": 4}}]}, bytes(4)),
        "binary_data_size is 4 but shape [1, 2] of FP32 takes 8 bytes",
    ),
    "bytes left over": (binary_body(BINARY_X, bytes(12)), "4 bytes after the JSON header and the inputs' binary data"),
    "binary without the header": ((orjson.dumps(BINARY_X), None), "has binary_data_size but the request has no"),
    "data and binary": (
        binary_body({"inputs": [{**BINARY_X["inputs"][0], "data": [1, 2]}]}, bytes(8)),
        "both 'data' and parameters.binary_data_size",
    ),
    "BOOL bytes not 0 or 1": (
        binary_body(
            {"inputs": [{**BINARY_X["inputs"][0], "datatype": "BOOL", "shape": [8]}]}, bytes([0, 1, 2] + [0] * 5)
        ),
        "BOOL binary data must be bytes 0 or 1",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_requests_get_a_400_naming_the_problem(case):
    (body, header_length), message = BAD[case]
    with pytest.raises(ApiError) as caught:
        parse_infer_request(body, header_length)
    assert caught.value.status == 400
    assert message in caught.value.message


def test_compressed_bodies_are_inflated_within_the_limit():
    body = orjson.dumps({"inputs": [tensor()]}) * 10
    assert decompress(gzip.compress(body), "gzip", len(body)) == body
    assert decompress(zlib.compress(body), "deflate", len(body)) == body
    assert decompress(body, None, 1) == body
    failures = {
        (gzip.compress(body), "gzip", len(body) - 1): (413, "larger than"),
        (gzip.compress(body)[:-12], "gzip", len(body)): (400, "gzip body is truncated"),
        (body, "gzip", len(body)): (400, "not valid gzip data"),
        (body, "br", len(body)): (415, "Content-Encoding 'br' is not supported"),
    }
    for args, (status, message) in failures.items():
        with pytest.raises(ApiError) as caught:
            decompress(*args)
        assert caught.value.status == status and message in caught.value.message
