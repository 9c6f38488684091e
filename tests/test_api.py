"""The HTTP service, end to end: a real uvicorn process, real SavedModels, a real HTTP client."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Server
from scipy.special import xlogy

from app.schemas import DIGIT_ZERO
from training import artifact, export_model, metrics
from training.data import digits


@pytest.fixture(scope="module")
def repository(digits_repository, tmp_path_factory):
    """The default digits model, a regression model, a model without dropout, a foreign SavedModel."""
    from sklearn.datasets import load_diabetes

    from training.data import Dataset
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(digits_repository / "digits", root / "digits")

    bunch = load_diabetes(scaled=False)
    diabetes = Dataset(
        "diabetes", bunch.data.astype(np.float32), bunch.target[:, None].astype(np.float32), "regression"
    )
    trained = train(
        diabetes, ModelConfig(hidden=(16,), dropout=0.1, input_dropout=0.1), TrainConfig(epochs=20, tau=0.001)
    )
    export_model(trained.model, root, "diabetes", task="regression", tau=trained.tau)

    inputs = keras.Input((64,))
    plain = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(inputs))
    export_model(plain, root, "plain", task="classification")

    data = digits()
    normalized = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    normalized.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    normalized.fit(data.x[:256], data.y[:256].ravel(), epochs=2, batch_size=64, verbose=0)  # moving stats != init
    export_model(normalized, root, "batchnorm", task="classification")

    class Foreign(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def double(self, x):
            return {"y": 2 * x}

    foreign = Foreign()
    tf.saved_model.save(foreign, str(root / "foreign" / "3"), signatures={"serving_default": foreign.double})
    return root


@pytest.fixture(scope="module")
def server(repository):
    server = Server(repository, default_model="digits", max_samples=500, max_instances=32, max_mc_rows=2000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def digits_model(repository):
    return tf.saved_model.load(str(repository / "digits" / "1"))


def test_predict_equals_the_saved_model_inference(client, digits_model):
    rows = digits().x[:20]
    response = client.post("/predict", json={"instances": rows.tolist()})
    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["version"]) == ("digits", 1)
    expected = digits_model.signatures["serving_default"](inputs=tf.constant(rows))["outputs"].numpy()
    got = np.array([p["probabilities"] for p in body["predictions"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    assert [p["label"] for p in body["predictions"]] == [str(k) for k in expected.argmax(axis=1)]
    assert [p["probability"] for p in body["predictions"]] == pytest.approx(expected.max(axis=1).tolist())
    assert body["class_labels"] == [str(d) for d in range(10)]


def entropy(p: np.ndarray) -> np.ndarray:
    return -xlogy(p, p).sum(axis=-1)


def test_mc_summaries_equal_values_recomputed_from_the_samples(client, repository):
    rows = digits().x[[0, 1, 2]].tolist()
    body = client.post(
        "/predict/mc-dropout", json={"instances": rows, "samples": 64, "seed": 17, "return_samples": True}
    ).json()
    assert (body["samples"], body["seed"]) == (64, 17)
    temperature = artifact.read_metadata(repository / "digits" / "1").predictive_temperature  # calibrated default
    for answer in body["predictions"]:
        samples = np.array(answer["samples"])  # raw: the calibration applies to their mean, the predictive
        assert samples.shape == (64, 10)
        mean = samples.mean(axis=0)
        predictive = metrics.temper(mean, temperature)
        np.testing.assert_allclose(answer["probabilities"], predictive, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(answer["std"], samples.std(axis=0), rtol=1e-9, atol=1e-15)
        assert answer["label"] == str(mean.argmax())
        assert answer["probability"] == max(answer["probabilities"])
        assert answer["predictive_entropy"] == pytest.approx(entropy(mean))
        assert answer["expected_entropy"] == pytest.approx(entropy(samples).mean())
        assert answer["mutual_information"] == pytest.approx(entropy(mean) - entropy(samples).mean(), abs=1e-12)
        votes = np.bincount(samples.argmax(axis=1), minlength=10)
        assert answer["variation_ratio"] == pytest.approx(1 - votes.max() / 64)


def test_seeded_requests_repeat_exactly_and_unseeded_ones_differ(client):
    request = {"instances": [DIGIT_ZERO, digits().x[5].tolist()], "samples": 50, "seed": 2024}
    first = client.post("/predict/mc-dropout", json=request)
    assert first.content == client.post("/predict/mc-dropout", json=request).content
    unseeded = {"instances": request["instances"], "samples": 50, "return_samples": True}
    a, b = (client.post("/predict/mc-dropout", json=unseeded).json() for _ in range(2))
    assert a["seed"] != b["seed"]
    assert a["predictions"][0]["samples"] != b["predictions"][0]["samples"]
    replay = client.post("/predict/mc-dropout", json={**unseeded, "seed": a["seed"]}).json()
    assert replay == a


def test_seeded_answer_survives_a_restart(repository):
    request = {"model": "digits", "instances": [DIGIT_ZERO], "samples": 30, "seed": 99, "return_samples": True}
    answers = []
    for _ in range(2):
        server = Server(repository)
        response = httpx.post(f"{server.url}/predict/mc-dropout", json=request, timeout=30)
        server.stop()
        assert response.status_code == 200, response.text
        answers.append(response.content)
    assert len(json.loads(answers[0])["predictions"][0]["samples"]) == 30
    assert answers[0] == answers[1]


def test_predict_is_unchanged_after_many_mc_requests_on_a_batchnorm_model(client, repository):
    """BatchNormalization is the layer ``training=True`` would corrupt (batch statistics, moving averages)."""
    rows = digits().x[:8].tolist()
    request = {"model": "batchnorm", "instances": rows}
    before = client.post("/predict", json=request)
    assert before.status_code == 200
    loaded = tf.saved_model.load(str(repository / "batchnorm" / "1")).signatures["serving_default"]
    expected = loaded(inputs=tf.constant(rows, tf.float32))["outputs"].numpy()
    got = np.array([p["probabilities"] for p in before.json()["predictions"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    for seed in range(40):
        mc = client.post("/predict/mc-dropout", json={**request, "samples": 20, "seed": seed})
        assert mc.status_code == 200
    assert client.post("/predict", json=request).content == before.content


def test_regression_reports_epistemic_aleatoric_and_interval(client, repository):
    row = [60.0, 2.0, 30.0, 100.0, 180.0, 110.0, 40.0, 4.0, 4.7, 90.0]
    body = client.post(
        "/predict/mc-dropout", json={"model": "diabetes", "instances": [row], "samples": 200, "seed": 1}
    ).json()
    answer = body["predictions"][0]
    tau = json.loads((repository / "diabetes" / "1" / "metadata.json").read_text())["tau"]
    assert answer["aleatoric_std"] == pytest.approx(1 / np.sqrt(tau))
    assert answer["total_std"] ** 2 == pytest.approx(answer["epistemic_std"] ** 2 + answer["aleatoric_std"] ** 2)
    low, high = answer["interval_95"]
    assert low == pytest.approx(answer["mean"] - 1.959964 * answer["total_std"])
    assert high == pytest.approx(answer["mean"] + 1.959964 * answer["total_std"])
    assert answer["epistemic_std"] > 0
    point = client.post("/predict", json={"model": "diabetes", "instances": [row]}).json()["predictions"][0]
    assert abs(point["value"] - answer["mean"]) < 3 * answer["epistemic_std"]


def test_foreign_saved_model_serves_raw_outputs(client):
    body = client.post("/predict", json={"model": "foreign", "instances": [[1.5, -2]]}).json()
    assert body["version"] == 3 and body["predictions"] == [{"outputs": [3.0, -4.0]}]


def test_model_listing_and_details(client):
    models = {m["name"]: m for m in client.get("/models").json()}
    assert set(models) == {"digits", "diabetes", "plain", "foreign", "batchnorm"}
    assert models["digits"]["default"] and not models["plain"]["default"]
    digits_info = client.get("/models/digits").json()
    version = digits_info["versions"][0]
    assert version["input_shape"] == [64] and version["mc_dropout"] is True
    assert [layer["rate"] for layer in version["dropout_layers"]] == [0.5, 0.5]
    assert version["metrics"]["test_deterministic"]["accuracy"] >= 0.95
    assert models["plain"]["versions"][0]["mc_dropout"] is False
    assert client.get("/models/nope").status_code == 404


def test_health_and_docs(client):
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").json() == {"status": "ready", "models": 5}
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["MCDropoutRequest"]["examples"][0]["instances"] == [DIGIT_ZERO]


def test_not_ready_without_models(tmp_path):
    (tmp_path / "empty").mkdir()
    server = Server(tmp_path / "empty")
    try:
        assert httpx.get(f"{server.url}/health/ready").status_code == 503
        assert httpx.get(f"{server.url}/health/live").status_code == 200
        response = httpx.post(f"{server.url}/predict", json={"instances": [[1]]})
        assert response.status_code == 404 and "no models are loaded" in response.json()["detail"]
    finally:
        server.stop()


GOOD = {"instances": [DIGIT_ZERO]}
ROW = DIGIT_ZERO


def raw(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


BAD_REQUESTS = {
    "short instance": ("/predict", {"json": {"instances": [ROW[:63]]}}, 422, "instances[0]: expected a list of 64"),
    "nested too deep": ("/predict", {"json": {"instances": [[ROW]]}}, 422, "instances[0]: expected a list of 64"),
    "scalar instance": ("/predict", {"json": {"instances": [3]}}, 422, "instances[0]: expected a list of 64"),
    "NaN": ("/predict", raw('{"instances": [[NaN' + ",1" * 63 + "]]}"), 422, "instances[0][0]: NaN and infinity"),
    "infinity": ("/predict", raw('{"instances": [[1' + ",1" * 62 + ",1e999]]}"), 422, "instances[0][63]: NaN and"),
    "beyond float32": ("/predict", {"json": {"instances": [[*ROW[:10], 1e39, *ROW[11:]]]}}, 422, "float32 range"),
    "a string": ("/predict", {"json": {"instances": [[*ROW[:5], "7", *ROW[6:]]]}}, 422, "instances[0][5]: expected a"),
    "a boolean": ("/predict", {"json": {"instances": [[True, *ROW[1:]]]}}, 422, "got bool True"),
    "a null": ("/predict", {"json": {"instances": [[None, *ROW[1:]]]}}, 422, "got NoneType None"),
    "empty instances": ("/predict", {"json": {"instances": []}}, 422, "instances: List should have at least 1"),
    "no instances": ("/predict", {"json": {"inputs": [ROW]}}, 422, "instances: Field required"),
    "not an object": ("/predict", {"json": [ROW]}, 422, "valid dictionary"),
    "unknown model": ("/predict", {"json": {**GOOD, "model": "mnist"}}, 404, "unknown model 'mnist'; loaded models"),
    "unknown version": ("/predict", {"json": {**GOOD, "version": 7}}, 404, "no loaded version 7; loaded: 1"),
    "version zero": ("/predict", {"json": {**GOOD, "version": 0}}, 422, "version: Input should be greater"),
    "malformed JSON": ("/predict", raw('{"instances": [[1, 2,'), 400, "not valid JSON"),
    "form-encoded body": (
        "/predict",
        {"content": json.dumps(GOOD).encode(), "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
        "send the body as JSON with 'Content-Type: application/json'",
    ),
    "too many instances": ("/predict", {"json": {"instances": [ROW] * 33}}, 422, "at most 32 per request"),
    "too many samples": ("/predict/mc-dropout", {"json": {**GOOD, "samples": 501}}, 422, "at most 500"),
    "zero samples": ("/predict/mc-dropout", {"json": {**GOOD, "samples": 0}}, 422, "samples: Input should be greater"),
    "samples x instances": (
        "/predict/mc-dropout",
        {"json": {"instances": [ROW] * 5, "samples": 500}},
        422,
        "samples x instances = 2500, at most 2000",
    ),
    "negative seed": ("/predict/mc-dropout", {"json": {**GOOD, "seed": -1}}, 422, "seed: Input should be greater"),
    "seed over int64": ("/predict/mc-dropout", {"json": {**GOOD, "seed": 2**63}}, 422, "seed: Input should be less"),
    "text samples": ("/predict/mc-dropout", {"json": {**GOOD, "samples": "many"}}, 422, "samples: Input should be"),
    "no mc signature": (
        "/predict/mc-dropout",
        {"json": {**GOOD, "model": "plain"}},
        422,
        "'plain' version 1 has no mc_dropout signature",
    ),
    "oversized body": ("/predict", raw('{"instances": [' + "1," * 3_000_000 + "1]}"), 413, "larger than"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_serving(case, client):
    path, request, status, message = BAD_REQUESTS[case]
    response = client.post(path, **request)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert client.post("/predict", json=GOOD).json()["predictions"][0]["label"] == "0"
    assert client.post("/predict/mc-dropout", json={**GOOD, "samples": 10}).status_code == 200


def test_oversized_streamed_body_without_length_is_refused(client):
    def chunks():
        yield b'{"instances": ['
        for _ in range(600):
            yield b"1," * 5000
        yield b"1]}"

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.post("/predict", json=GOOD).status_code == 200


def test_concurrent_clients_all_get_correct_answers(client):
    expected = client.post("/predict", json=GOOD).json()
    mc_expected = client.post("/predict/mc-dropout", json={**GOOD, "seed": 5}).json()

    def call(i: int):
        if i % 2:
            return client.post("/predict", json=GOOD).json() == expected
        return client.post("/predict/mc-dropout", json={**GOOD, "seed": 5}).json() == mc_expected

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(call, range(200)))
