"""Other servers' v2 clients point at the v2 door unchanged, with the parameters they send.

KServe's own client (``InferRequest`` through ``InferenceRESTClient``) runs live. Seldon MLServer
cannot be installed beside this service (it pins ``fastapi<0.116``), so its request is the one its
``NumpyRequestCodec.encode_request`` builds (recorded from mlserver 1.7.1: the request and its one
input carry ``"parameters": {"content_type": "np"}``, and the input is named ``input-1``).
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from conftest import Server
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


@pytest.fixture(scope="module")
def server(tiny_classifier_dir):
    server = Server(tiny_classifier_dir.parents[1], access_log="false")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rows(digit_rows) -> np.ndarray:
    return digit_rows[:4].astype(np.float32)


def _native(server: Server, path: str, **body) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _kserve(server: Server, request: InferRequest):
    async def infer():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        try:
            return await client.infer(server.url, data=request, model_name="tiny")
        finally:
            await client.close()

    return asyncio.run(infer())


def _input(rows: np.ndarray, name: str = "inputs", **parameters) -> InferInput:
    tensor = InferInput(name, list(rows.shape), "FP32", parameters=parameters or None)
    tensor.set_data_from_numpy(rows, binary_data=False)
    return tensor


def test_kserve_infer_request_with_content_type_equals_native_predict(server, rows):
    native = _native(server, "/predict", instances=rows.tolist())["predictions"]
    request = InferRequest(
        "tiny", [_input(rows, content_type="np")], parameters={"content_type": "np", "kserve-custom": "kept out"}
    )
    response = _kserve(server, request)
    (output,) = response.outputs
    assert output.name == "outputs" and output.shape == [4, 10]
    np.testing.assert_array_equal(output.as_numpy(), np.array([p["probabilities"] for p in native], np.float32))


def test_kserve_mc_parameters_equal_native_mc_for_the_same_seed(server, rows):
    native = _native(server, "/predict/mc-dropout", instances=rows.tolist(), samples=20, seed=5)
    parameters = {"mc_dropout": True, "samples": 20, "seed": 5, "content_type": "np"}
    response = _kserve(server, InferRequest("tiny", [_input(rows)], parameters=parameters))
    assert {k: response.parameters[k] for k in ("mc_dropout", "samples", "seed")} == {
        "mc_dropout": True,
        "samples": 20,
        "seed": 5,
    }
    tensors = {output.name: output.as_numpy() for output in response.outputs}
    np.testing.assert_allclose(tensors["probabilities"], [p["probabilities"] for p in native["predictions"]])
    np.testing.assert_allclose(
        tensors["mutual_information"], [p["mutual_information"] for p in native["predictions"]], atol=1e-12
    )


def _mlserver_numpy_request(rows: np.ndarray) -> dict:
    """What ``mlserver.codecs.NumpyRequestCodec.encode_request(rows)`` sends (mlserver 1.7.1)."""
    return {
        "parameters": {"content_type": "np"},
        "inputs": [
            {
                "name": "input-1",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "parameters": {"content_type": "np"},
                "data": rows.reshape(-1).tolist(),
            }
        ],
    }


def test_an_mlserver_numpy_codec_request_is_served_as_one_tensor(server, rows):
    native = _native(server, "/predict", instances=rows.tolist())["predictions"]
    response = httpx.post(f"{server.url}/v2/models/tiny/infer", json=_mlserver_numpy_request(rows), timeout=60)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["shape"] == [4, 10]
    np.testing.assert_array_equal(
        np.array(output["data"], np.float32).reshape(4, 10), np.array([p["probabilities"] for p in native], np.float32)
    )


def test_without_content_type_np_the_input_must_carry_the_models_name(server, rows):
    body = _mlserver_numpy_request(rows)
    del body["parameters"]
    response = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body, timeout=60)
    assert response.status_code == 400
    assert "takes one input, 'inputs'; got 'input-1'" in response.json()["error"]
