"""Prediction sets, conformal intervals and abstention through a real server, on tiny trained models.

Coverage is checked on rows nothing was fitted or calibrated on: the digits test rows (classifier),
and fresh rows drawn from the synthetic regression's distribution, averaged over requests with
their own seeds (MC masks and tie-breaks), within binomial error.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from conftest import Server

from training import conformity, export_model
from training.data import Dataset

ALPHAS = (0.3, 0.1, 0.05)
SEEDS = (11, 12, 13)


def _wave(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """y = sin(3x) + noise growing with |x|: a heteroscedastic regression a normalized score should follow."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(rows, 1)).astype(np.float32)
    y = np.sin(3 * x) + rng.normal(size=x.shape) * (0.05 + 0.3 * np.abs(x))
    return x, y.astype(np.float32)


@pytest.fixture(scope="module")
def repository(tiny_classifier, tmp_path_factory):
    """``digits`` and ``wave`` calibrated on their held-out rows; ``plain``, the same classifier without scores."""
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("conformal-serving")
    rows = tiny_classifier.calibration
    common = {"task": "classification", "class_labels": list("0123456789")}
    temperatures = {
        "temperature": tiny_classifier.temperature,
        "predictive_temperature": tiny_classifier.predictive_temperature,
    }
    calibration = conformity.CalibrationRows(rows.x, rows.y, source="held out", default_risk=0.2)
    export_model(tiny_classifier.model, root, "digits", **common, **temperatures, calibration=calibration)
    export_model(tiny_classifier.model, root, "plain", **common, **temperatures)
    x, y = _wave(2000, 0)
    wave = train(
        Dataset("wave", x, y, "regression"),
        ModelConfig(hidden=(32,), dropout=0.1),
        TrainConfig(epochs=30, batch_size=64, mc_samples=20),
    )
    rows = conformity.CalibrationRows(wave.calibration.x, wave.calibration.y, source="held out")
    export_model(wave.model, root, "wave", task="regression", tau=wave.tau, calibration=rows)
    return root


@pytest.fixture(scope="module")
def server(repository):
    running = Server(repository, default_model="digits")
    yield running
    running.stop()


def _mc(server: Server, instances: np.ndarray, **fields) -> dict:
    response = httpx.post(
        f"{server.url}/predict/mc-dropout", json={"instances": instances.tolist(), **fields}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def _band(alpha: float, rows: int, calibration_rows: int) -> float:
    """4 binomial standard errors of the test rows, plus 2 of the calibration set's own spread."""
    return 4 * math.sqrt(alpha * (1 - alpha) / rows) + 2 * math.sqrt(alpha * (1 - alpha) / calibration_rows)


def test_served_sets_cover_the_test_digits_and_grow_as_alpha_shrinks(server, tiny_classifier):
    test = tiny_classifier.test
    sizes = {}
    for alpha in ALPHAS:
        covered, size = [], []
        for seed in SEEDS:
            answer = _mc(server, test.x, model="digits", seed=seed, alpha=alpha)
            assert answer["alpha"] == alpha and answer["risk"] == 0.2 and "conformal_note" not in answer
            sets = [p["prediction_set"] for p in answer["predictions"]]
            covered += [str(label) in s for label, s in zip(test.y, sets, strict=True)]
            size += [len(s) for s in sets]
        assert abs(np.mean(covered) - (1 - alpha)) < _band(alpha, len(test.y), 468), (alpha, np.mean(covered))
        sizes[alpha] = np.mean(size)
    assert sizes[0.3] < sizes[0.1] < sizes[0.05]


def test_served_intervals_cover_fresh_rows_and_widen_as_alpha_shrinks(server):
    widths = {}
    for alpha in ALPHAS:
        covered, width = [], []
        for seed in SEEDS:
            x, y = _wave(400, 100 + seed)  # fresh rows of the same distribution
            answer = _mc(server, x, model="wave", seed=seed, alpha=alpha, samples=100)
            intervals = np.array([p["interval"] for p in answer["predictions"]])
            gaussian = np.array([p["interval_95"] for p in answer["predictions"]])
            assert intervals.shape == gaussian.shape == (400, 2) and "risk" not in answer
            covered += list((intervals[:, 0] <= y[:, 0]) & (y[:, 0] <= intervals[:, 1]))
            width += list(intervals[:, 1] - intervals[:, 0])
        assert abs(np.mean(covered) - (1 - alpha)) < _band(alpha, 1200, 320), (alpha, np.mean(covered))
        widths[alpha] = np.mean(width)
    assert widths[0.3] < widths[0.1] < widths[0.05]


def test_abstention_answers_the_requested_risk_and_a_replay_is_identical(server, tiny_classifier):
    test = tiny_classifier.test
    strict, loose = (_mc(server, test.x[:100], seed=5, risk=risk) for risk in (0.05, 0.5))
    assert strict["risk"] == 0.05 and loose["risk"] == 0.5
    abstained = [sum(p["abstain"] for p in a["predictions"]) for a in (strict, loose)]
    assert abstained[0] >= abstained[1] and abstained[0] > 0  # a 3-epoch model: abstains often at 5 %
    assert _mc(server, test.x[:100], seed=5, risk=0.05) == strict  # sets and abstention replay with the seed


def test_another_t_still_answers_and_says_the_guarantee_is_approximate(server, tiny_classifier):
    answer = _mc(server, tiny_classifier.test.x[:3], samples=10, seed=1)
    assert "T = 100" in answer["conformal_note"] and "T = 10" in answer["conformal_note"]
    assert all("prediction_set" in p for p in answer["predictions"])


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": "0.1"}, "alpha"),
        ({"risk": 1.5}, "risk"),
        ({"risk": 0.0}, "risk"),
    ],
)
def test_bad_levels_are_a_422_naming_the_field(server, digit_rows, fields, named):
    response = httpx.post(
        f"{server.url}/predict/mc-dropout", json={"instances": digit_rows[:1].tolist(), **fields}, timeout=30
    )
    assert response.status_code == 422 and response.json()["detail"].startswith(f"{named}:"), response.text


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"mc_dropout": True, "alpha": 2}, "parameters.alpha"),
        ({"mc_dropout": True, "risk": "low"}, "parameters.risk"),
        ({"alpha": 0.1}, "parameters.samples, seed, tolerance, alpha and risk need parameters.mc_dropout"),
    ],
)
def test_bad_v2_levels_are_a_400_naming_the_parameter(server, digit_rows, parameters, named):
    tensor = {"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": digit_rows[0].tolist()}
    body = {"inputs": [tensor], "parameters": parameters}
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"].startswith(named), response.text


def test_v2_answers_sets_and_abstention_as_tensors_equal_to_the_native_answer(server, digit_rows):
    rows = digit_rows[:4]
    native = _mc(server, rows, seed=9, alpha=0.2, risk=0.3)
    tensor = {"name": "inputs", "shape": [4, 64], "datatype": "FP32", "data": rows.reshape(-1).tolist()}
    body = {
        "inputs": [tensor],
        "parameters": {"mc_dropout": True, "seed": 9, "alpha": 0.2, "risk": 0.3},
        "outputs": [{"name": "prediction_set"}, {"name": "abstain"}],
    }
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["parameters"]["alpha"] == 0.2 and answer["parameters"]["risk"] == 0.3
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["prediction_set"]["datatype"] == "BOOL" and outputs["prediction_set"]["shape"] == [4, 10]
    members = np.array(outputs["prediction_set"]["data"]).reshape(4, 10)
    assert [[str(k) for k in np.flatnonzero(m)] for m in members] == [
        p["prediction_set"] for p in native["predictions"]
    ]
    assert outputs["abstain"]["data"] == [p["abstain"] for p in native["predictions"]]


def test_a_model_without_scores_answers_without_the_fields_and_says_why(server, digit_rows):
    answer = _mc(server, digit_rows[:2], model="plain", seed=3)
    assert {"alpha", "risk"}.isdisjoint(answer)
    assert all({"prediction_set", "abstain"}.isdisjoint(p) for p in answer["predictions"])
    info = httpx.get(f"{server.url}/models/plain", timeout=10).json()["versions"][0]
    assert info["conformal"] is None and "no conformal calibration stored" in info["conformal_unavailable"]
    calibrated = httpx.get(f"{server.url}/models/digits", timeout=10).json()["versions"][0]
    assert calibrated["conformal_unavailable"] is None and calibrated["conformal"]["rows"] == 468
    assert calibrated["conformal"]["score"] == "lac" and calibrated["conformal"]["delta"] == 0.2
    assert calibrated["conformal"]["uncertainty"] == "1 - probability + 3 * mutual information"
    metadata = httpx.get(f"{server.url}/v2/models/plain", timeout=10).json()
    assert "prediction_set" not in metadata["parameters"]["mc_dropout_outputs"]
    assert (
        "prediction_set"
        in httpx.get(f"{server.url}/v2/models/digits", timeout=10).json()["parameters"]["mc_dropout_outputs"]
    )
