"""The documented defaults and settings hold on a real server: limits, default model, versions, host and port."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import keras
import pytest
from conftest import Server

from app.schemas import DIGIT_ZERO
from training import export_model

GOOD = {"instances": [DIGIT_ZERO]}


@pytest.fixture(scope="module")
def repository(tiny_classifier_dir, tmp_path_factory) -> Path:
    """``alpha`` (one version) and ``beta`` (version 1 = alpha's network, version 2 a different one)."""
    root = tmp_path_factory.mktemp("configured") / "models"
    shutil.copytree(tiny_classifier_dir, root / "alpha" / "1")
    shutil.copytree(tiny_classifier_dir, root / "beta" / "1")
    other = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    assert export_model(other, root, "beta", task="classification").name == "2"
    return root


@pytest.fixture(scope="module")
def defaults(repository):
    server = Server(repository)
    yield server
    server.stop()


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/predict", {"instances": [DIGIT_ZERO] * 1025}, "instances: 1025 given, at most 1024 per request"),
        ("/predict/mc-dropout", {**GOOD, "samples": 10_001}, "samples: 10001 asked, at most 10000"),
        (
            "/predict/mc-dropout",
            {"instances": [DIGIT_ZERO] * 201, "samples": 1000},
            "samples x instances = 201000, at most 200000",
        ),
        (
            "/predict/mc-dropout",
            {"instances": [DIGIT_ZERO] * 11, "samples": 1000, "return_samples": True},
            "1000 x 11 x 10 = 110000 values, at most 100000",
        ),
    ],
    ids=["1024 instances", "10000 samples", "200000 rows", "100000 returned values"],
)
def test_default_limits(defaults, path, body, message):
    response = post(defaults, path, body)
    assert response.status_code == 422 and message in response.json()["detail"], response.text
    at_the_limit = {"instances": [DIGIT_ZERO] * 1024}
    assert post(defaults, "/predict", at_the_limit).status_code == 200


def test_default_samples_and_default_model_is_the_first_by_name(defaults):
    answer = post(defaults, "/predict/mc-dropout", GOOD).json()
    assert answer["samples"] == 100 and answer["model"] == "alpha"
    models = {m["name"]: m for m in httpx.get(f"{defaults.url}/models").json()}
    assert models["alpha"]["default"] and not models["beta"]["default"]


def test_latest_version_only_by_default(defaults):
    beta = httpx.get(f"{defaults.url}/models/beta").json()
    assert [v["version"] for v in beta["versions"]] == [2] and beta["latest"] == 2
    assert post(defaults, "/predict", {**GOOD, "model": "beta"}).json()["version"] == 2
    response = post(defaults, "/predict", {**GOOD, "model": "beta", "version": 1})
    assert response.status_code == 404 and "no loaded version 1" in response.json()["detail"]


def test_all_versions_a_named_default_model_and_default_samples(repository):
    server = Server(repository, load_all_versions="true", default_model="beta", default_samples=7)
    try:
        beta = httpx.get(f"{server.url}/models/beta").json()
        assert [v["version"] for v in beta["versions"]] == [1, 2] and beta["latest"] == 2 and beta["default"]
        latest = post(server, "/predict", GOOD).json()
        assert (latest["model"], latest["version"]) == ("beta", 2)
        first = post(server, "/predict", {**GOOD, "version": 1}).json()
        assert first["version"] == 1 and first["predictions"] != latest["predictions"]
        answer = post(server, "/predict/mc-dropout", {**GOOD, "version": 1}).json()
        assert (answer["model"], answer["version"], answer["samples"]) == ("beta", 1, 7)
    finally:
        server.stop()


def test_python_m_app_serves_on_host_and_port_and_an_unknown_default_falls_back(repository):
    server = Server(repository, entry="app", default_model="gamma")  # HOST=127.0.0.1 and a free PORT
    try:
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert post(server, "/predict", GOOD).json()["model"] == "alpha"
    finally:
        assert server.stop() == 0
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in Path(server.log.name).read_text()
