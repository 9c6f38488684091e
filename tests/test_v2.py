"""The Open Inference Protocol v2 door, end to end: tritonclient and httpx against a real uvicorn process."""

from __future__ import annotations

import gzip
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import keras
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from conftest import Server
from tritonclient.utils import InferenceServerException

from app.schemas import DIGIT_ZERO
from training import export_model
from training.data import digits

ROWS = digits().x[:5].astype(np.float32)
MC_CLASSIFICATION = [
    "probabilities",
    "std",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
]
CONFORMAL = ["prediction_set", "abstain"]
"""The default model is calibrated (held-out rows), so its MC answer also has sets and abstention."""


@pytest.fixture(scope="module")
def repository(digits_repository, tmp_path_factory):
    """The default digits model, a small regression model (trained for seconds), one without dropout, a broken one."""
    from sklearn.datasets import load_diabetes

    from training.data import Dataset
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("v2") / "models"
    shutil.copytree(digits_repository / "digits", root / "digits")
    bunch = load_diabetes(scaled=False)
    data = Dataset("diabetes", bunch.data.astype(np.float32), bunch.target[:, None].astype(np.float32), "regression")
    trained = train(data, ModelConfig(hidden=(16,), dropout=0.1, input_dropout=0.1), TrainConfig(epochs=5, tau=0.001))
    export_model(trained.model, root, "diabetes", task="regression", tau=trained.tau)
    inputs = keras.Input((64,))
    export_model(
        keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(inputs)), root, "plain", task="classification"
    )
    broken = root / "broken" / "1"
    (broken / "variables").mkdir(parents=True)
    for path in (broken / "saved_model.pb", broken / "variables" / "variables.index"):
        path.write_bytes(b"not a SavedModel")
        os.utime(path, (0, 0))  # settled long ago: loaded (and failing) at start-up
    return root


@pytest.fixture(scope="module")
def server(repository):
    server = Server(
        repository,
        default_model="digits",
        max_samples=500,
        max_instances=32,
        max_mc_rows=2000,
        model_control="explicit",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tc(server):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    yield client
    client.close()


def native(client: httpx.Client, path: str, **body) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def tensor_input(rows: np.ndarray = ROWS, binary: bool = True, name: str = "inputs") -> triton.InferInput:
    return triton.InferInput(name, list(rows.shape), triton.np_to_triton_dtype(rows.dtype)).set_data_from_numpy(
        rows, binary_data=binary
    )


def test_health_and_server_metadata(tc):
    assert tc.is_server_live() and tc.is_server_ready()
    metadata = tc.get_server_metadata()
    assert metadata["name"] == "dropout-serve"
    assert {"binary_tensor_data", "model_repository", "mc_dropout"} <= set(metadata["extensions"])


def test_model_metadata_and_readiness(tc):
    metadata = tc.get_model_metadata("digits")
    assert metadata == tc.get_model_metadata("digits", "1")
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    assert metadata["platform"] == "tensorflow_savedmodel"
    assert metadata["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["outputs"] == [{"name": "outputs", "datatype": "FP32", "shape": [-1, 10]}]
    assert metadata["parameters"]["mc_dropout"] is True
    assert metadata["parameters"]["mc_dropout_outputs"].split(",") == MC_CLASSIFICATION + CONFORMAL
    assert tc.is_model_ready("digits") and tc.is_model_ready("digits", "1")
    assert not tc.is_model_ready("digits", "7") and not tc.is_model_ready("mnist")
    with pytest.raises(InferenceServerException) as caught:
        tc.get_model_metadata("mnist")
    assert caught.value.status() == "404" and "mnist" in caught.value.message()


@pytest.mark.parametrize(
    ("binary_in", "binary_out"), [(True, None), (True, False), (False, True), (False, False)], ids=str
)
def test_infer_equals_predict(tc, client, binary_in, binary_out):
    expected = [p["probabilities"] for p in native(client, "/predict", instances=ROWS.tolist())["predictions"]]
    outputs = None if binary_out is None else [triton.InferRequestedOutput("outputs", binary_data=binary_out)]
    result = tc.infer("digits", [tensor_input(binary=binary_in)], outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("digits", "1", "r-1")
    probabilities = result.as_numpy("outputs")
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 10)
    np.testing.assert_array_equal(probabilities, np.array(expected, np.float32))
    assert ("data" in result.get_output("outputs")) == (binary_out is False)


def test_concurrent_binary_requests_each_get_their_own_rows(client):
    rows = digits().x[:30].astype(np.float32)
    expected = native(client, "/predict", instances=rows.tolist())["predictions"]

    def call(i: int) -> bool:
        one = rows[i : i + 1]
        body, length = triton.InferenceServerClient.generate_request_body([tensor_input(one)])
        response = client.post(INFER, content=body, headers={"Inference-Header-Content-Length": str(length)})
        length = int(response.headers["Inference-Header-Content-Length"])
        result = triton.InferResult.from_response_body(response.content, header_length=length)
        return np.array_equal(result.as_numpy("outputs")[0], np.float32(expected[i]["probabilities"]))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(call, list(range(30)) * 3))


def test_metadata_of_a_model_without_dropout(tc):
    parameters = tc.get_model_metadata("plain")["parameters"]
    assert parameters == {"task": "classification", "mc_dropout": False, "mc_dropout_outputs": ""}


def test_infer_with_a_version_and_integer_data(tc, client):
    expected = native(client, "/predict", instances=ROWS.tolist())["predictions"]
    integers = ROWS.astype(np.int64)  # the digits pixels are integers 0-16
    result = tc.infer("digits", [tensor_input(integers, binary=False)], model_version="1")
    np.testing.assert_array_equal(result.as_numpy("outputs"), [p["probabilities"] for p in expected])


def test_parameters_this_server_does_not_know_are_ignored_at_every_level(client):
    """Other servers' clients send their own (MLServer's content_type, anyone's custom ones)."""
    plain = client.post(INFER, **json_request())
    assert plain.status_code == 200, plain.text
    tensor = {**json_request()["json"]["inputs"][0], "parameters": {"content_type": "np", "custom": 1}}
    body = {
        "parameters": {"content_type": "np", "sampels": 3, "headers": "x"},
        "inputs": [tensor],
        "outputs": [{"name": "outputs", "parameters": {"content_type": "np"}}],
    }
    peer = client.post(INFER, json=body)
    assert peer.status_code == 200, peer.text
    assert "parameters" not in peer.json(), "an unknown parameter does not switch MC on"
    assert peer.json()["outputs"] == plain.json()["outputs"]
    mc_body = {"parameters": {**body["parameters"], "mc_dropout": True, "samples": 5, "seed": 3}, "inputs": [tensor]}
    mc = client.post(INFER, json=mc_body)
    assert mc.status_code == 200, mc.text
    parameters = mc.json()["parameters"]
    assert {key: parameters.pop(key) for key in ("alpha", "risk")} == {"alpha": 0.1, "risk": 0.05}  # calibrated
    assert "T = 5" in parameters.pop("conformal_note")
    assert parameters == {"mc_dropout": True, "samples": 5, "seed": 3}


def test_plain_json_with_nested_data(client):
    body = {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP64", "data": [DIGIT_ZERO]}]}
    response = client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("outputs", "FP32", [1, 10])
    expected = native(client, "/predict", instances=[DIGIT_ZERO])["predictions"][0]["probabilities"]
    np.testing.assert_array_equal(np.float32(output["data"]), np.float32(expected))
    assert "id" not in response.json() and "parameters" not in response.json()


def test_mc_dropout_through_v2_equals_the_native_endpoint(tc, client):
    expected = native(client, "/predict/mc-dropout", instances=ROWS.tolist(), samples=64, seed=17)
    result = tc.infer("digits", [tensor_input()], parameters={"mc_dropout": True, "samples": 64, "seed": 17})
    parameters = result.get_response()["parameters"]
    assert {key: parameters.pop(key) for key in ("alpha", "risk")} == {"alpha": 0.1, "risk": 0.05}
    assert "T = 100" in parameters.pop("conformal_note")  # the calibration's T; this request asked 64
    assert parameters == {"mc_dropout": True, "samples": 64, "seed": 17}
    assert [o["name"] for o in result.get_response()["outputs"]] == MC_CLASSIFICATION + CONFORMAL
    predictions = expected["predictions"]
    members = result.as_numpy("prediction_set")
    assert members.dtype == np.bool_ and members.shape == (5, 10)
    assert [[str(k) for k in np.flatnonzero(m)] for m in members] == [p["prediction_set"] for p in predictions]
    np.testing.assert_array_equal(result.as_numpy("abstain"), [p["abstain"] for p in predictions])
    for name, key in [("probabilities", "probabilities"), ("std", "std")]:
        assert result.as_numpy(name).shape == (5, 10)
        np.testing.assert_array_equal(result.as_numpy(name), [p[key] for p in predictions])
    for name in MC_CLASSIFICATION[2:]:
        assert result.as_numpy(name).dtype == np.float64
        np.testing.assert_array_equal(result.as_numpy(name), [p[name] for p in predictions])


def test_mc_outputs_can_be_selected_and_unseeded_requests_state_their_seed(tc):
    outputs = [triton.InferRequestedOutput("mutual_information", binary_data=False)]
    first = tc.infer("digits", [tensor_input()], outputs=outputs, parameters={"mc_dropout": True, "samples": 20})
    response = first.get_response()
    assert [o["name"] for o in response["outputs"]] == ["mutual_information"]
    assert response["parameters"]["samples"] == 20
    seed = response["parameters"]["seed"]
    again = tc.infer(
        "digits", [tensor_input()], outputs=outputs, parameters={"mc_dropout": True, "samples": 20, "seed": seed}
    )
    np.testing.assert_array_equal(again.as_numpy("mutual_information"), first.as_numpy("mutual_information"))
    other = tc.infer("digits", [tensor_input()], outputs=outputs, parameters={"mc_dropout": True, "samples": 20})
    assert other.get_response()["parameters"]["seed"] != seed


def test_regression_mc_through_v2_equals_the_native_endpoint(tc, client):
    rows = np.array([[60.0, 2.0, 30.0, 100.0, 180.0, 110.0, 40.0, 4.0, 4.7, 90.0]] * 2, np.float32)
    rows[1, 0] = 30
    expected = native(client, "/predict/mc-dropout", model="diabetes", instances=rows.tolist(), samples=50, seed=3)
    result = tc.infer("diabetes", [tensor_input(rows)], parameters={"mc_dropout": True, "samples": 50, "seed": 3})
    predictions = expected["predictions"]
    np.testing.assert_array_equal(result.as_numpy("mean")[:, 0], [p["mean"] for p in predictions])
    np.testing.assert_array_equal(result.as_numpy("epistemic_std")[:, 0], [p["epistemic_std"] for p in predictions])
    np.testing.assert_array_equal(result.as_numpy("aleatoric_std")[:, 0], [p["aleatoric_std"] for p in predictions])
    np.testing.assert_array_equal(result.as_numpy("total_std")[:, 0], [p["total_std"] for p in predictions])
    np.testing.assert_array_equal(result.as_numpy("interval_lower")[:, 0], [p["interval_95"][0] for p in predictions])
    np.testing.assert_array_equal(result.as_numpy("interval_upper")[:, 0], [p["interval_95"][1] for p in predictions])
    point = tc.infer("diabetes", [tensor_input(rows)]).as_numpy("outputs")
    np.testing.assert_array_equal(
        point[:, 0],
        np.float32(
            [p["value"] for p in native(client, "/predict", model="diabetes", instances=rows.tolist())["predictions"]]
        ),
    )


def test_gzip_request_bodies(tc, client):
    expected = native(client, "/predict", instances=ROWS.tolist())["predictions"]
    result = tc.infer("digits", [tensor_input()], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(result.as_numpy("outputs"), [p["probabilities"] for p in expected])


def test_repository_index_shows_states_and_load_errors(tc, client):
    index = tc.get_model_repository_index()
    assert {"name": "digits", "version": "1", "state": "READY", "reason": ""} in index
    assert {entry["name"] for entry in index} == {"digits", "diabetes", "plain", "broken"}
    (broken,) = [entry for entry in index if entry["name"] == "broken"]
    assert broken["version"] == "1" and broken["state"] == "UNAVAILABLE" and broken["reason"]
    ready = client.post("/v2/repository/index", json={"ready": True}).json()
    assert {entry["name"] for entry in ready} == {"digits", "diabetes", "plain"}
    assert not tc.is_model_ready("broken")
    with pytest.raises(InferenceServerException) as caught:
        tc.load_model("broken")
    assert caught.value.status() == "400" and "failed to load 'broken': version 1:" in caught.value.message()


def test_unload_and_load_a_model(tc):
    rows = np.zeros((1, 10), np.float32)
    tc.unload_model("diabetes")
    assert not tc.is_model_ready("diabetes")
    with pytest.raises(InferenceServerException) as caught:
        tc.infer("diabetes", [tensor_input(rows)])
    assert caught.value.status() == "404"
    assert {"name": "diabetes", "state": "UNAVAILABLE", "reason": "not loaded"} in tc.get_model_repository_index()
    tc.load_model("diabetes")
    assert tc.is_model_ready("diabetes")
    assert tc.infer("diabetes", [tensor_input(rows)]).as_numpy("outputs").shape == (1, 1)
    with pytest.raises(InferenceServerException) as caught:
        tc.load_model("mnist")
    assert caught.value.status() == "404"


def test_openapi_documents_the_v2_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    schema = infer["requestBody"]["content"]["application/json"]["schema"]
    assert "mc_dropout" in schema["properties"]["parameters"]["properties"]
    assert "/v2/models/{name}/versions/{version}/ready" in paths and "/v2/repository/index" in paths


def binary_request(header: dict, data: bytes, length: int | str | None = None) -> dict:
    head = orjson.dumps(header)
    return {"content": head + data, "headers": {"Inference-Header-Content-Length": str(length or len(head))}}


def json_request(rows=None, shape=(5, 64), datatype="FP32", name="inputs", **fields) -> dict:
    tensor = {"name": name, "shape": list(shape), "datatype": datatype, "data": ROWS.tolist() if rows is None else rows}
    return {"json": {"inputs": [tensor], **fields}}


ZERO_HEADER = {
    "inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]
}
INFER = "/v2/models/digits/infer"
BAD = {
    "unknown model": ("/v2/models/mnist/infer", json_request(), 404, "unknown model 'mnist'"),
    "unknown version": ("/v2/models/digits/versions/7/infer", json_request(), 404, "7"),
    "version not a number": ("/v2/models/digits/versions/latest/infer", json_request(), 400, "positive integer"),
    "datatype an object": (INFER, json_request(datatype={}), 400, "datatype: expected one of"),
    "outputs null": (INFER, json_request(outputs=None), 400, "outputs: null is not allowed"),
    "wrong input name": (INFER, json_request(name="INPUT0"), 400, "takes one input, 'inputs'; got 'INPUT0'"),
    "wrong shape": (INFER, json_request(rows=[DIGIT_ZERO[:63]], shape=(1, 63)), 400, "shape [1, 63] does not match"),
    "flat shape": (INFER, json_request(rows=DIGIT_ZERO, shape=(64,)), 400, "shape [64] does not match [-1, 64]"),
    "wrong count": (INFER, json_request(rows=[DIGIT_ZERO], shape=(2, 64)), 400, "64 values, but shape [2, 64]"),
    "BYTES": (INFER, json_request(rows=["a"], shape=(1,), datatype="BYTES"), 400, "BYTES tensors are not supported"),
    "BOOL": (INFER, json_request(rows=[True] * 64, shape=(1, 64), datatype="BOOL"), 400, "datatype BOOL"),
    "unknown datatype": (INFER, json_request(datatype="FLOAT32"), 400, "datatype: expected one of"),
    "too many instances": (INFER, json_request(rows=[DIGIT_ZERO] * 33, shape=(33, 64)), 400, "at most 32"),
    "samples without mc": (INFER, json_request(parameters={"samples": 3}), 400, "need parameters.mc_dropout"),
    "too many samples": (
        INFER,
        json_request(parameters={"mc_dropout": True, "samples": 501}),
        400,
        "at most 500",
    ),
    "model without dropout": (
        "/v2/models/plain/infer",
        json_request(parameters={"mc_dropout": True}),
        400,
        "'plain' version 1 has no mc_dropout signature",
    ),
    "negative seed": (INFER, json_request(parameters={"mc_dropout": True, "seed": -1}), 400, "parameters.seed"),
    "unknown output": (INFER, json_request(outputs=[{"name": "probs"}]), 400, "unknown output 'probs'"),
    "MC output without mc": (INFER, json_request(outputs=[{"name": "std"}]), 400, "an inference request has: outputs"),
    "malformed JSON": (INFER, {"content": b'{"inputs": [', "headers": {}}, 400, "not valid JSON"),
    "malformed header length": (INFER, binary_request(ZERO_HEADER, bytes(256), "12x"), 400, "Header-Content-Length"),
    "header length past the body": (INFER, binary_request(ZERO_HEADER, bytes(256), 99_999), 400, "has only"),
    "body too short": (INFER, binary_request(ZERO_HEADER, bytes(200)), 400, "only 200 bytes of binary data remain"),
    "NaN in binary": (
        INFER,
        binary_request(ZERO_HEADER, np.full(64, np.nan, np.float32).tobytes()),
        400,
        "value at [0, 0] is NaN",
    ),
    "bad gzip": (INFER, {"content": b"not gzip", "headers": {"content-encoding": "gzip"}}, 400, "not valid gzip"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(case, client, tc):
    path, request, status, message = BAD[case]
    response = client.post(path, **request)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.json()
    assert tc.infer("digits", [tensor_input()]).as_numpy("outputs").shape == (5, 10)


def test_errors_reach_tritonclient_as_its_exception(tc):
    with pytest.raises(InferenceServerException) as caught:
        tc.infer("digits", [tensor_input(ROWS[:, :63])])
    assert caught.value.status() == "400" and "does not match" in caught.value.message()


def test_gzip_of_a_huge_body_is_refused(client):
    bomb = gzip.compress(b" " * 20_000_000)
    response = client.post(INFER, content=bomb, headers={"content-encoding": "gzip"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]
