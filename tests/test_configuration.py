"""The documented defaults and settings hold on a real server: limits, default model, versions, host and port."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import keras
import pytest
from conftest import Server

from app.schemas import DIGIT_ZERO
from app.settings import Settings
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


def test_python_m_app_serves_on_host_and_port_and_an_unknown_default_keeps_readiness_503(repository):
    server = Server(repository, entry="app", default_model="gamma")  # HOST=127.0.0.1 and a free PORT
    try:
        ready = httpx.get(f"{server.url}/health/ready")
        assert ready.status_code == 503 and ready.json()["models"] == 2, ready.text
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
        unnamed = post(server, "/predict", GOOD)
        assert unnamed.status_code == 404 and "unknown model 'gamma'" in unnamed.json()["detail"]
        assert post(server, "/predict", {**GOOD, "model": "alpha"}).json()["model"] == "alpha"
    finally:
        assert server.stop() == 0
    log = Path(server.log.name).read_text()
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in log
    assert "the default model 'gamma' (DROPOUT_SERVE_DEFAULT_MODEL) does not serve; readiness answers 503" in log


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_default_model_stays_put_when_a_model_that_sorts_first_is_published(repository, tmp_path):
    live = tmp_path / "models"
    shutil.copytree(repository, live)
    server = Server(live, poll_seconds=0.2)
    try:
        assert post(server, "/predict", GOOD).json()["model"] == "alpha"
        shutil.copytree(live / "alpha", live / "aaa")
        _wait_for(lambda: "aaa" in [m["name"] for m in httpx.get(f"{server.url}/models").json()])
        models = {m["name"]: m["default"] for m in httpx.get(f"{server.url}/models").json()}
        assert models == {"aaa": False, "alpha": True, "beta": False}
        assert post(server, "/predict", GOOD).json()["model"] == "alpha"
    finally:
        server.stop()


def test_a_configured_default_that_appears_later_makes_the_server_ready(repository, tmp_path):
    live = tmp_path / "models"
    shutil.copytree(repository, live)
    server = Server(live, poll_seconds=0.2, default_model="gamma")
    try:
        assert httpx.get(f"{server.url}/health/ready").status_code == 503
        shutil.copytree(live / "alpha", live / "gamma")
        _wait_for(lambda: httpx.get(f"{server.url}/health/ready").status_code == 200)
        assert post(server, "/predict", GOOD).json()["model"] == "gamma"
    finally:
        server.stop()
    assert "the default model 'gamma' serves; ready" in Path(server.log.name).read_text()


def test_model_control_is_off_by_default(defaults):
    for action in ("unload", "load"):
        response = httpx.post(f"{defaults.url}/v2/repository/models/alpha/{action}", content=b"{}")
        assert response.status_code == 403, response.text
        assert f"model control is off: clients cannot {action} models" in response.json()["error"]
        assert "DROPOUT_SERVE_MODEL_CONTROL=explicit" in response.json()["error"]
    assert post(defaults, "/predict", {**GOOD, "model": "alpha"}).status_code == 200


def test_the_mc_endpoint_names_an_unknown_field(defaults):
    response = post(defaults, "/predict/mc-dropout", {**GOOD, "sample": 5})
    assert response.status_code == 422
    assert response.json()["detail"] == "sample: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("body", "values"),
    [
        ({**GOOD, "samples": 10_000}, "10000 samples"),
        ({"instances": [DIGIT_ZERO] * 20, "samples": 10_000}, "200000 rows"),
        ({"instances": [DIGIT_ZERO] * 10, "samples": 1000, "return_samples": True}, "100000 values"),
    ],
    ids=["10000 samples", "200000 rows", "100000 returned values"],
)
def test_default_limits_at_their_boundary_are_served(defaults, body, values):
    response = post(defaults, "/predict/mc-dropout", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["samples"] == body["samples"] and len(answer["predictions"]) == len(body["instances"])
    if body.get("return_samples"):
        assert sum(len(p["samples"]) * len(p["samples"][0]) for p in answer["predictions"]) == 100_000


def _readme_defaults() -> dict[str, str]:
    """``DROPOUT_SERVE_X`` -> its documented default, from the README's configuration table."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `DROPOUT_SERVE_([A-Z_]+)`(?: / `_([A-Z_]+)`)? \| ([^|]+) \|", readme, re.MULTILINE)
    documented = {}
    for name, second, default in rows:
        values = re.findall(r"`([^`]*)`", default)
        documented[name] = values[0] if values else default.strip()
        if second:
            documented[second] = values[1]
    return documented


def test_documented_defaults_are_the_settings_defaults():
    documented = _readme_defaults()
    settings = Settings(_env_file=None)
    for name in ("HOST", "PORT", "MAX_IN_FLIGHT", "REQUEST_TIMEOUT", "MAX_SAMPLES", "MAX_MC_ROWS"):
        assert name in documented, f"DROPOUT_SERVE_{name} is not in the README's configuration table"
    for name in ("MAX_RETURN_VALUES", "MAX_INSTANCES", "DEFAULT_SAMPLES", "MODEL_CONTROL", "MAX_BODY_BYTES"):
        assert name in documented, f"DROPOUT_SERVE_{name} is not in the README's configuration table"
    assert (documented["HOST"], documented["PORT"]) == (settings.host, str(settings.port)) == ("0.0.0.0", "8000")
    assert float(documented["REQUEST_TIMEOUT"]) == settings.request_timeout == 30
    assert int(documented["MAX_IN_FLIGHT"]) == settings.max_in_flight == 256
    assert int(documented["MAX_SAMPLES"]) == settings.max_samples == 10_000
    assert int(documented["MAX_MC_ROWS"]) == settings.max_mc_rows == 200_000
    assert int(documented["MAX_RETURN_VALUES"]) == settings.max_return_values == 100_000
    assert int(documented["MAX_INSTANCES"]) == settings.max_instances == 1024
    assert int(documented["DEFAULT_SAMPLES"]) == settings.default_samples == 100
    assert int(documented["MAX_BODY_BYTES"]) == settings.max_body_bytes
    assert documented["MODEL_CONTROL"] == settings.model_control == "none"
