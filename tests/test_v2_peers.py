"""Other servers' v2 clients point at the v2 door unchanged, with the parameters they send.

KServe's own client (``InferRequest`` through ``InferenceRESTClient``) runs live, in a process of its
own: kserve and tritonclient (which the gRPC door imports) each register the protocol's generated
messages under the same names, which protobuf refuses in one process. Seldon MLServer
cannot be installed beside this service (it pins ``fastapi<0.116``), so its request is the one its
``NumpyRequestCodec.encode_request`` builds (recorded from mlserver 1.7.1: the request and its one
input carry ``"parameters": {"content_type": "np"}``, and the input is named ``input-1``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import Server

KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

spec = json.load(sys.stdin)
rows = np.asarray(spec["rows"], np.float32)
tensor = InferInput("inputs", list(rows.shape), "FP32", parameters=spec["input_parameters"] or None)
tensor.set_data_from_numpy(rows, binary_data=False)


async def infer():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    try:
        request = InferRequest("tiny", [tensor], parameters=spec["parameters"])
        return await client.infer(spec["url"], data=request, model_name="tiny")
    finally:
        await client.close()


response = asyncio.run(infer())
outputs = {o.name: {"shape": list(o.shape), "data": o.as_numpy().tolist()} for o in response.outputs}
print(json.dumps({"parameters": dict(response.parameters or {}), "outputs": outputs}))
"""


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


def _kserve(server: Server, rows: np.ndarray, parameters: dict, input_parameters: dict | None = None) -> dict:
    """KServe's client sends ``rows`` as an ``InferRequest`` with these parameters; its parsed answer."""
    spec = {"url": server.url, "rows": rows.tolist(), "parameters": parameters, "input_parameters": input_parameters}
    done = subprocess.run(
        [sys.executable, "-c", KSERVE_CLIENT], input=json.dumps(spec), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kserve_infer_request_with_content_type_equals_native_predict(server, rows):
    native = _native(server, "/predict", instances=rows.tolist())["predictions"]
    response = _kserve(server, rows, {"content_type": "np", "kserve-custom": "kept out"}, {"content_type": "np"})
    (name,) = response["outputs"]
    output = response["outputs"][name]
    assert name == "outputs" and output["shape"] == [4, 10]
    np.testing.assert_array_equal(
        np.array(output["data"], np.float32), np.array([p["probabilities"] for p in native], np.float32)
    )


def test_kserve_mc_parameters_equal_native_mc_for_the_same_seed(server, rows):
    native = _native(server, "/predict/mc-dropout", instances=rows.tolist(), samples=20, seed=5)
    parameters = {"mc_dropout": True, "samples": 20, "seed": 5, "content_type": "np"}
    response = _kserve(server, rows, parameters)
    assert {k: response["parameters"][k] for k in ("mc_dropout", "samples", "seed")} == {
        "mc_dropout": True,
        "samples": 20,
        "seed": 5,
    }
    tensors = {name: np.array(output["data"]) for name, output in response["outputs"].items()}
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
