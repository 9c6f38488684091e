"""The hot-route shortcut answers exactly as FastAPI's router does, for good and bad requests alike."""

from __future__ import annotations

import orjson
import pytest
from fastapi.testclient import TestClient

from app import hot_routes
from app.hot_routes import HotRoutes
from app.main import create_app
from app.protocols import native
from app.schemas import DIGIT_ZERO
from app.settings import Settings

V2_ZERO = {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}]}
REQUESTS = [  # (path, body or raw bytes, content type, expected status)
    ("/predict", {"instances": [DIGIT_ZERO]}, "application/json", 200),
    ("/predict", {"instances": [DIGIT_ZERO], "model": "tiny", "version": 1}, "application/json", 200),
    ("/predict", {"instances": [DIGIT_ZERO], "model": "nope"}, "application/json", 404),
    ("/predict", {"instances": [DIGIT_ZERO[:10]]}, "application/json", 422),
    ("/predict", {"instances": [DIGIT_ZERO], "extra": 1}, "application/json", 422),
    ("/predict", b'{"instances": [[1, 2', "application/json", 400),
    ("/predict", {"instances": [DIGIT_ZERO]}, "text/plain", 415),
    ("/predict/mc-dropout", {"instances": [DIGIT_ZERO], "samples": 20, "seed": 7}, "application/json", 200),
    ("/predict/mc-dropout", {"instances": [DIGIT_ZERO], "samples": 0}, "application/json", 422),
    ("/v1/models/tiny:predict", {"instances": [DIGIT_ZERO]}, "application/json", 200),
    ("/v1/models/tiny:predict", {"instances": [DIGIT_ZERO], "bad": 1}, "application/json", 400),
    ("/v1/models/nope:predict", {"instances": [DIGIT_ZERO]}, "application/json", 404),
    ("/v2/models/tiny/infer", V2_ZERO, "application/json", 200),
    ("/v2/models/tiny/infer", {"inputs": [{**V2_ZERO["inputs"][0], "datatype": "FP99"}]}, "application/json", 400),
]


def _client(repository, shortcut: bool) -> TestClient:
    app = create_app(Settings(model_dir=repository, default_model="tiny", poll_seconds=0, access_log=False))
    if not shortcut:
        app.hot_endpoints = ()
    return TestClient(app)


def _send(client: TestClient, path: str, body, content_type: str):
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, content=content, headers={"content-type": content_type})


@pytest.fixture(scope="module")
def clients(tiny_classifier_dir):
    repository = tiny_classifier_dir.parent.parent
    with _client(repository, shortcut=True) as hot, _client(repository, shortcut=False) as routed:
        yield hot, routed


@pytest.mark.parametrize(("path", "body", "content_type", "status"), REQUESTS)
def test_the_shortcut_answers_as_the_router_does(clients, monkeypatch, path, body, content_type, status):
    hot, routed = clients
    taken = []
    serve = HotRoutes._serve
    monkeypatch.setattr(HotRoutes, "_serve", staticmethod(lambda *args: taken.append(args[0].path) or serve(*args)))
    by_shortcut = _send(hot, path, body, content_type)
    assert taken, f"{path} did not take the shortcut"
    by_router = _send(routed, path, body, content_type)
    assert len(taken) == 1, "the app without the shortcut took it"
    assert by_shortcut.status_code == status, by_shortcut.text
    assert by_router.status_code == status, by_router.text
    assert by_shortcut.json() == by_router.json()
    assert by_shortcut.headers["content-type"] == by_router.headers["content-type"]


def test_other_routes_and_methods_go_to_the_router(clients):
    hot, _ = clients
    assert hot.get("/predict").status_code == 405
    assert hot.get("/models/tiny").json()["name"] == "tiny"
    assert hot.post("/v2/repository/index").status_code == 200


def test_every_hot_endpoint_must_be_a_route():
    with pytest.raises(ValueError, match="every hot endpoint"):
        HotRoutes(lambda scope, receive, send: None, routers=[native.router], endpoints=[hot_routes.HotRoutes.__call__])


def test_with_fastapi_telemetry_on_every_request_goes_through_fastapi(tiny_classifier_dir, monkeypatch):
    app = create_app(Settings(model_dir=tiny_classifier_dir.parents[1], default_model="tiny", poll_seconds=0))
    telemetry = getattr(app, "_native_telemetry", None)
    if telemetry is None:  # a FastAPI without native telemetry: nothing to trace, the shortcut stays
        assert not hot_routes._native_telemetry_on(app)
        return
    monkeypatch.setattr(telemetry, "enabled", lambda: True)  # as with a tracer provider configured
    taken = []
    serve = HotRoutes._serve
    monkeypatch.setattr(HotRoutes, "_serve", staticmethod(lambda *args: taken.append(args[0].path) or serve(*args)))
    with TestClient(app) as client:
        answer = _send(client, "/predict", {"instances": [DIGIT_ZERO]}, "application/json")
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in "0123456789"
    assert not taken, "the shortcut skipped FastAPI's span"


def test_an_unexpected_error_is_the_same_plain_500_on_both_paths(tiny_classifier_dir, monkeypatch):
    """Not an ApiError: FastAPI's ServerErrorMiddleware answers a plain 500; the shortcut must too."""
    from app.dataplane import DataPlane

    async def broken(self, request):
        raise RuntimeError("a bug, not the client's fault")

    monkeypatch.setattr(DataPlane, "infer", broken)
    answers = []
    for shortcut in (True, False):
        app = _client(tiny_classifier_dir.parents[1], shortcut).app
        with TestClient(app, raise_server_exceptions=False) as client:
            answers.append(_send(client, "/predict", {"instances": [DIGIT_ZERO]}, "application/json"))
    for answer in answers:
        assert answer.status_code == 500
        assert answer.text == "Internal Server Error"
        assert answer.headers["content-type"].startswith("text/plain")
