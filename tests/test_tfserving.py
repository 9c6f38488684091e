"""TF Serving's REST API, called as its documentation calls it, against a real uvicorn process."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import tensorflow as tf
from conftest import Server
from prometheus_client.parser import text_string_to_metric_families

from app.schemas import DIGIT_ZERO
from training.data import digits

ROWS = digits().x[:3].tolist()


@pytest.fixture(scope="module")
def repository(digits_repository, tmp_path_factory):
    """The digits model as versions 1 and 2 (same files), labelled stable and canary."""
    root = tmp_path_factory.mktemp("tfs") / "models"
    shutil.copytree(digits_repository / "digits" / "1", root / "digits" / "1")
    shutil.copytree(digits_repository / "digits" / "1", root / "digits" / "2")
    config = root.parent / "models.yaml"
    config.write_text("models:\n  digits:\n    version_policy: {all: true}\n    labels: {stable: 1, canary: 2}\n")
    return root


@pytest.fixture(scope="module")
def client(repository):
    server = Server(repository, model_config=repository.parent / "models.yaml")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    server.stop()


@pytest.fixture(scope="module")
def saved_model(repository):
    return tf.saved_model.load(str(repository / "digits" / "1"))


def test_row_and_columnar_predict_equal_the_saved_model(client, saved_model):
    expected = saved_model.signatures["serving_default"](inputs=tf.constant(ROWS, tf.float32))["outputs"].numpy()
    # curl's -d sends a form content type; TF Serving does not mind, and neither do we.
    row = client.post("/v1/models/digits:predict", content=f'{{"instances": {ROWS}}}'.encode())
    assert row.status_code == 200, row.text
    np.testing.assert_array_equal(np.array(row.json()["predictions"], np.float32), expected)
    named = client.post("/v1/models/digits/versions/2:predict", json={"instances": [{"inputs": r} for r in ROWS]})
    assert named.status_code == 200 and named.json() == row.json()
    columnar = client.post("/v1/models/digits/labels/stable:predict", json={"inputs": {"inputs": ROWS}})
    assert columnar.status_code == 200 and columnar.json() == {"outputs": row.json()["predictions"]}
    native = client.post("/predict", json={"instances": ROWS}).json()
    assert [p["probabilities"] for p in native["predictions"]] == row.json()["predictions"]


def test_mc_dropout_signature_gives_the_native_endpoints_samples(client):
    request = {"signature_name": "mc_dropout", "inputs": {"inputs": ROWS, "samples": 20, "seed": 7}}
    response = client.post("/v1/models/digits:predict", json=request)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]  # two named outputs (the model is calibrated), as TF Serving answers
    assert set(outputs) == {"outputs", "predictive"}
    samples, predictive = np.array(outputs["outputs"]), np.array(outputs["predictive"])
    assert samples.shape == (20, 3, 10) and predictive.shape == (3, 10)
    native = client.post(
        "/predict/mc-dropout", json={"instances": ROWS, "samples": 20, "seed": 7, "return_samples": True}
    )
    assert native.status_code == 200
    for i, answer in enumerate(native.json()["predictions"]):
        np.testing.assert_array_equal(np.array(answer["samples"]), samples[:, i])
        # The native answer computes the calibrated predictive from the draws in float64 (the same whichever
        # calls drew them, README "MC dropout at the speed of /predict"); the signature's is float32.
        np.testing.assert_allclose(np.array(answer["probabilities"]), predictive[i], rtol=2e-6, atol=1e-12)


def test_mc_dropout_signature_traffic_is_counted_in_the_uncertainty_histograms(client):
    def counted() -> float:
        text = client.get("/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        family = families.get("dropout_serve_mc_mutual_information_nats")
        labels = {"model": "digits", "version": "2"}
        samples = family.samples if family else []
        return sum(s.value for s in samples if s.name.endswith("_count") and s.labels == labels)

    before = counted()
    request = {"signature_name": "mc_dropout", "inputs": {"inputs": ROWS, "samples": 10, "seed": 1}}
    assert client.post("/v1/models/digits:predict", json=request).status_code == 200
    assert counted() == before + len(ROWS)


def test_status_lists_versions_and_labels_resolve(client):
    body = client.get("/v1/models/digits").json()
    assert body == {
        "model_version_status": [
            {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} for v in "12"
        ]
    }
    assert client.get("/v1/models/digits/versions/2").json()["model_version_status"][0]["version"] == "2"
    assert client.get("/v1/models/digits/labels/canary").json()["model_version_status"][0]["version"] == "2"
    assert client.get("/models/digits").json()["labels"] == {"stable": 1, "canary": 2}


def test_metadata_has_tf_servings_signature_def_shape(client):
    body = client.get("/v1/models/digits/labels/canary/metadata").json()
    assert body["model_spec"] == {"name": "digits", "signature_name": "", "version": "2"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    serving = defs["serving_default"]
    assert serving["method_name"] == "tensorflow/serving/predict"
    assert serving["inputs"]["inputs"]["dtype"] == "DT_FLOAT"
    assert serving["inputs"]["inputs"]["tensor_shape"]["dim"] == [
        {"size": "-1", "name": ""},
        {"size": "64", "name": ""},
    ]
    assert set(defs["mc_dropout"]["inputs"]) == {"inputs", "samples", "seed"}


BAD = {
    "unknown model": ("/v1/models/mnist:predict", {"instances": [DIGIT_ZERO]}, 404, "unknown model 'mnist'"),
    "unknown version": ("/v1/models/digits/versions/9:predict", {"instances": [DIGIT_ZERO]}, 404, "version 9"),
    "unknown label": ("/v1/models/digits/labels/beta:predict", {"instances": [DIGIT_ZERO]}, 404, "label 'beta'"),
    "wrong shape": ("/v1/models/digits:predict", {"instances": [[1, 2]]}, 400, "expected a list of 64"),
    "both formats": (
        "/v1/models/digits:predict",
        {"instances": [DIGIT_ZERO], "inputs": [DIGIT_ZERO]},
        400,
        "exactly one",
    ),
    "no input": ("/v1/models/digits:predict", {"signature_name": "serving_default"}, 400, "exactly one"),
    "signature not a string": (
        "/v1/models/digits:predict",
        {"signature_name": {}, "instances": [DIGIT_ZERO]},
        400,
        "'signature_name' must be a string",
    ),
    "unknown signature": ("/v1/models/digits:predict", {"signature_name": "x", "instances": [DIGIT_ZERO]}, 400, "'x'"),
    "mc in rows": (
        "/v1/models/digits:predict",
        {"signature_name": "mc_dropout", "instances": [DIGIT_ZERO]},
        400,
        "columnar format",
    ),
    "mc without seed": (
        "/v1/models/digits:predict",
        {"signature_name": "mc_dropout", "inputs": {"inputs": [DIGIT_ZERO], "samples": 5}},
        400,
        "takes the inputs",
    ),
    "mc text samples": (
        "/v1/models/digits:predict",
        {"signature_name": "mc_dropout", "inputs": {"inputs": [DIGIT_ZERO], "samples": "5", "seed": 1}},
        400,
        "'samples' must be a positive integer",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_tf_serving_errors(case, client):
    path, body, status, message = BAD[case]
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.post("/v1/models/digits:predict", json={"instances": [DIGIT_ZERO]}).status_code == 200


def test_malformed_json_and_unknown_routes(client):
    response = client.post("/v1/models/digits:predict", content=b'{"instances": [')
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    assert client.get("/v1/models/nope").status_code == 404
    assert "error" in client.get("/v1/models/nope").json()
    not_a_number = client.get("/v1/models/digits/versions/two")
    assert not_a_number.status_code == 400 and "version" in not_a_number.json()["error"]
