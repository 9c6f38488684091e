"""Operating the service, end to end on a real uvicorn: API keys, request ids and logs, metrics, CORS, limits."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server, slow_body
from prometheus_client.parser import text_string_to_metric_families

from app.schemas import DIGIT_ZERO

KEYS = ("first-key-3f9a7c", "second-key-b41e02")
GOOD = {"instances": [DIGIT_ZERO]}
ORIGIN = "https://dashboard.example"
PREDICT_OK = {"route": "/predict", "method": "POST", "version": "1", "status": "200"}


@pytest.fixture(scope="module")
def repository(tiny_classifier_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ops") / "models"
    shutil.copytree(tiny_classifier_dir, root / "tiny" / "1")
    return root


@pytest.fixture(scope="module")
def keyed(repository):
    """API keys (also on /metrics), JSON logs, CORS for one origin, a small return_samples bound, model control."""
    server = Server(
        repository,
        api_keys=",".join(KEYS),
        metrics_require_key="true",
        log_format="json",
        cors_origins=ORIGIN,
        max_return_values=1000,
        model_control="explicit",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited(repository, tmp_path_factory):
    """No keys, text logs, MC switched off, one request in flight at a time, a 1.5 s deadline."""
    root = tmp_path_factory.mktemp("limited") / "models"
    shutil.copytree(repository, root)
    server = Server(root, mc_dropout_enabled="false", max_in_flight=1, request_timeout=1.5)
    yield server
    server.stop()


def log_text(server: Server) -> str:
    server.log.flush()
    return Path(server.log.name).read_text()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


NATIVE = {"/predict", "/predict/mc-dropout", "/models", "/models/{name}", "/metrics"}


def protected_calls(server: Server) -> list[tuple[str, str, str, dict]]:
    """Every route of the OpenAPI document (every door) and /metrics: (method, template, path, request)."""
    document = httpx.get(f"{server.url}/openapi.json").json()
    calls = [("GET", "/metrics", "/metrics", {})]
    for template, operations in document["paths"].items():
        if template.startswith(("/health/", "/v2/health/")):
            continue
        path = template.replace("{name}", "tiny").replace("{version}", "1").replace("{label}", "stable")
        for method in operations:
            body = {"json": {**GOOD, "samples": 5} if "mc-dropout" in path else GOOD} if method == "post" else {}
            calls.append((method.upper(), template, path, body))
    assert len(calls) >= 5
    return sorted(calls, key=lambda call: call[2].endswith("/load"))  # the model is loaded again after /unload


def test_every_protected_route_refuses_without_a_key_and_accepts_with_one(keyed):
    for method, template, path, body in protected_calls(keyed):
        missing = httpx.request(method, keyed.url + path, **body)
        assert missing.status_code == 401, (path, missing.text)
        assert missing.headers["www-authenticate"] == 'Bearer realm="dropout-serve"'
        assert "API key is required" in next(iter(missing.json().values()))
        wrong = httpx.request(method, keyed.url + path, headers={"X-API-Key": KEYS[0][:-1]}, **body)
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        for headers in ({"Authorization": f"Bearer {KEYS[0]}"}, {"X-API-Key": KEYS[1]}):
            accepted = httpx.request(method, keyed.url + path, headers=headers, **body)
            # past the key check; other doors may refuse the native body itself, but not for want of a key
            assert accepted.status_code == 200 if template in NATIVE else accepted.status_code != 401, (path, accepted)
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"):
        assert httpx.get(keyed.url + path).status_code == 200, path


def test_keys_never_appear_in_logs_or_metrics(keyed):
    for key in KEYS:
        httpx.post(f"{keyed.url}/predict", json=GOOD, headers={"Authorization": f"Bearer {key}"})
        httpx.post(f"{keyed.url}/predict", json=GOOD, headers={"X-API-Key": key + "x"})
    exposition = httpx.get(f"{keyed.url}/metrics", headers={"X-API-Key": KEYS[0]}).text
    text = log_text(keyed) + exposition
    assert "dropout_serve_requests_total" in exposition
    for key in KEYS:
        assert key not in text and key[:10] not in text


def test_json_access_log_carries_the_request_id(keyed):
    headers = {"X-API-Key": KEYS[0], "X-Request-ID": "trace-42.a"}
    response = httpx.post(f"{keyed.url}/predict/mc-dropout", json={**GOOD, "samples": 7}, headers=headers)
    assert response.headers["x-request-id"] == "trace-42.a"
    generated = httpx.post(f"{keyed.url}/predict", json=GOOD, headers={"X-API-Key": KEYS[0]}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    unsafe = httpx.get(f"{keyed.url}/health/live", headers={"X-Request-ID": "x" * 129}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe)
    time.sleep(0.2)
    lines = [json.loads(line) for line in log_text(keyed).splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "request_id", "message"} <= set(line) for line in lines)
    (mc,) = [line for line in lines if line["request_id"] == "trace-42.a"]
    assert mc["method"] == "POST" and mc["path"] == "/predict/mc-dropout" and mc["status"] == 200
    assert (mc["model"], mc["version"], mc["instances"], mc["samples"]) == ("tiny", 1, 1, 7)
    assert mc["latency_ms"] > 0
    (predict,) = [line for line in lines if line["request_id"] == generated]
    assert predict["samples"] is None and predict["route"] == "/predict"


def test_every_line_written_while_serving_carries_the_request_id(keyed):
    """Unloading and loading a model logs from the registry (in a worker thread) inside the request."""
    for action, request_id in (("unload", "unload-1"), ("load", "reload-1")):
        headers = {"X-API-Key": KEYS[0], "X-Request-ID": request_id, "content-type": "application/json"}
        response = httpx.post(f"{keyed.url}/v2/repository/models/tiny/{action}", content=b"{}", headers=headers)
        assert response.status_code == 200, response.text
    time.sleep(0.2)
    lines = [json.loads(line) for line in log_text(keyed).splitlines() if line.startswith("{")]
    by_id = {rid: [line["message"] for line in lines if line["request_id"] == rid] for rid in ("unload-1", "reload-1")}
    assert any(m.startswith("retiring tiny version 1") for m in by_id["unload-1"]), by_id
    assert any(m.startswith("loaded tiny version 1") for m in by_id["reload-1"]), by_id
    assert httpx.post(f"{keyed.url}/predict", json=GOOD, headers={"X-API-Key": KEYS[0]}).status_code == 200


def scrape(server: Server, **headers: str) -> dict:
    response = httpx.get(f"{server.url}/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return metric_samples(response.text)


def test_metrics_cover_traffic_models_and_uncertainty_and_move_with_requests(keyed):
    auth = {"X-API-Key": KEYS[0]}
    assert httpx.get(f"{keyed.url}/metrics").status_code == 401
    before = scrape(keyed, **auth)
    ok = {"route": "/predict/mc-dropout", "method": "POST", "model": "tiny", "version": "1", "status": "200"}
    rows = [DIGIT_ZERO, [16] * 64, [0] * 64]
    for _ in range(3):
        assert httpx.post(f"{keyed.url}/predict/mc-dropout", json={"instances": rows, "samples": 20}, headers=auth)
    assert httpx.post(f"{keyed.url}/predict", json={"instances": rows}, headers=auth).status_code == 200
    assert httpx.post(f"{keyed.url}/predict", json={**GOOD, "model": "nope"}, headers=auth).status_code == 404
    assert httpx.get(f"{keyed.url}/models/tiny", headers=auth).status_code == 200
    after = scrape(keyed, **auth)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("dropout_serve_requests_total", **ok) == 3
    unknown = {**ok, "route": "/predict", "model": "", "version": "", "status": "404"}
    assert grew("dropout_serve_requests_total", **unknown) == 1
    assert grew("dropout_serve_request_duration_seconds_count", **{k: v for k, v in ok.items() if k != "status"}) == 3
    tiny = {"model": "tiny", "version": "1"}
    assert grew("dropout_serve_mc_samples_count", **tiny) == 3 and grew("dropout_serve_mc_samples_sum", **tiny) == 60
    assert grew("dropout_serve_mc_predictive_entropy_nats_count", **tiny) == 9
    assert grew("dropout_serve_mc_mutual_information_nats_count", **tiny) == 9
    assert grew("dropout_serve_mc_predictive_entropy_nats_sum", **tiny) > 0
    assert grew("dropout_serve_predict_top_probability_count", **tiny) == 3
    assert (
        grew("dropout_serve_batch_rows_sum", **tiny) == 3
        and grew("dropout_serve_batch_queue_wait_seconds_count", **tiny) == 1
    )
    assert value(after, "dropout_serve_model_loaded", **tiny) == 1
    assert value(after, "dropout_serve_model_load_seconds_count", model="tiny") >= 1  # reloaded by the auth test
    assert value(after, "dropout_serve_requests_in_flight") == 1  # the scrape itself
    assert value(after, "process_resident_memory_bytes") > 10_000_000
    routes = {dict(labels).get("route") for _, labels in after}
    assert "/models/{name}" in routes and "/models/tiny" not in routes  # templates, not raw paths


def test_cors_answers_the_configured_origin_only(keyed, limited):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    answer = httpx.options(f"{keyed.url}/predict", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    simple = httpx.post(f"{keyed.url}/predict", json=GOOD, headers={"Origin": ORIGIN, "X-API-Key": KEYS[0]})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
    refused = httpx.options(f"{keyed.url}/predict", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in refused.headers
    off = httpx.post(f"{limited.url}/predict", json=GOOD, headers={"Origin": ORIGIN})
    assert off.status_code == 200 and "access-control-allow-origin" not in off.headers


def test_return_samples_is_bounded_separately(keyed):
    auth = {"X-API-Key": KEYS[0]}
    over = httpx.post(
        f"{keyed.url}/predict/mc-dropout", json={**GOOD, "samples": 101, "return_samples": True}, headers=auth
    )
    assert over.status_code == 422
    assert "101 x 1 x 10 = 1010 values, at most 1000 (DROPOUT_SERVE_MAX_RETURN_VALUES)" in over.json()["detail"]
    body = {**GOOD, "samples": 100, "return_samples": True}
    assert httpx.post(f"{keyed.url}/predict/mc-dropout", json=body, headers=auth).status_code == 200
    summary_only = {**GOOD, "samples": 101}
    assert httpx.post(f"{keyed.url}/predict/mc-dropout", json=summary_only, headers=auth).status_code == 200


def test_mc_dropout_can_be_switched_off(limited):
    response = httpx.post(f"{limited.url}/predict/mc-dropout", json=GOOD)
    assert response.status_code == 403
    assert "switched off on this server (DROPOUT_SERVE_MC_DROPOUT_ENABLED=false)" in response.json()["detail"]
    assert httpx.post(f"{limited.url}/predict", json=GOOD).status_code == 200


TF_MC = {"signature_name": "mc_dropout", "inputs": {"inputs": [DIGIT_ZERO], "samples": 101, "seed": 1}}
V2_MC = {
    "inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": DIGIT_ZERO}],
    "parameters": {"mc_dropout": True, "samples": 10},
}


def test_the_mc_switch_and_the_return_bound_hold_on_every_door(keyed, limited):
    tf_serving = httpx.post(f"{limited.url}/v1/models/tiny:predict", json=TF_MC)
    assert tf_serving.status_code == 403 and "switched off" in tf_serving.json()["error"]
    v2 = httpx.post(f"{limited.url}/v2/models/tiny/infer", json=V2_MC)
    assert v2.status_code == 403 and "switched off" in v2.json()["error"]
    assert httpx.post(f"{limited.url}/v2/models/tiny/infer", json={"inputs": V2_MC["inputs"]}).status_code == 200
    auth = {"X-API-Key": KEYS[0]}
    over = httpx.post(f"{keyed.url}/v1/models/tiny:predict", json=TF_MC, headers=auth)  # returns every sample
    assert over.status_code == 400 and "at most 1000 (DROPOUT_SERVE_MAX_RETURN_VALUES)" in over.json()["error"]
    within = {**TF_MC, "inputs": {**TF_MC["inputs"], "samples": 100}}
    assert httpx.post(f"{keyed.url}/v1/models/tiny:predict", json=within, headers=auth).status_code == 200


def test_overload_is_refused_with_503_and_retry_after(limited):
    results: dict[str, httpx.Response] = {}
    slow = threading.Thread(
        target=lambda: results.setdefault("slow", httpx.post(f"{limited.url}/predict", **slow_body(1.0), timeout=30))
    )
    slow.start()
    time.sleep(0.4)
    refused = httpx.post(f"{limited.url}/predict", json=GOOD)
    assert httpx.get(f"{limited.url}/health/ready").status_code == 200  # probes are never refused
    slow.join()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "limit of 1 requests in progress (DROPOUT_SERVE_MAX_IN_FLIGHT)" in refused.json()["detail"]
    assert results["slow"].status_code == 200
    assert httpx.post(f"{limited.url}/predict", json=GOOD).status_code == 200


def test_a_request_past_its_deadline_gets_504_and_frees_its_slot(limited):
    started = time.monotonic()
    try:
        response = httpx.post(f"{limited.url}/predict", **slow_body(3.0), timeout=30)
    except httpx.TransportError:  # the server may close the connection while the body is still coming
        pytest.fail("the deadline must be answered, not cut")
    assert response.status_code == 504, response.text
    assert "longer than 1.5 s (DROPOUT_SERVE_REQUEST_TIMEOUT)" in response.json()["detail"]
    assert time.monotonic() - started < 3.0 + 1.0
    deadline = time.monotonic() + 10
    while httpx.post(f"{limited.url}/predict", json=GOOD).status_code != 200:
        assert time.monotonic() < deadline, "the abandoned request kept its slot"
        time.sleep(0.2)
    text = log_text(limited)
    assert re.search(r"INFO dropout_serve\.access \[[0-9a-f]{32}\] POST /predict 504 \d", text)
    assert re.search(r"\[[0-9a-f]{32}\] POST /predict 200 [\d.]+ms model=tiny version=1 instances=1", text)


def test_uncertainty_histograms_for_regression_and_batching():
    from prometheus_client import REGISTRY, generate_latest

    from app import metrics
    from training.uncertainty import summarize_regression

    draws = np.random.default_rng(0).normal(size=(50, 4, 1)) * np.array([0.01, 0.1, 1, 10])[None, :, None]
    summary = summarize_regression(draws, tau=4.0)
    metrics.observe_mc("reg", 3, "regression", summary)
    metrics.observe_batch("reg", 3, rows=12, queue_wait_seconds=0.002)
    metrics.model_load_failed("reg", 4)
    samples = metric_samples(generate_latest(REGISTRY).decode())
    labels = {"model": "reg", "version": "3"}
    assert value(samples, "dropout_serve_mc_epistemic_std_count", **labels) == 4
    assert value(samples, "dropout_serve_mc_epistemic_std_sum", **labels) == pytest.approx(summary.epistemic_std.sum())
    assert value(samples, "dropout_serve_mc_total_std_bucket", **labels, le="0.3") == 0  # all >= 1/sqrt(4)
    assert value(samples, "dropout_serve_batch_rows_sum", **labels) == 12
    assert value(samples, "dropout_serve_batch_queue_wait_seconds_bucket", **labels, le="0.0025") == 1
    assert value(samples, "dropout_serve_model_load_failures_total", model="reg") == 1
    assert value(samples, "dropout_serve_model_loaded", model="reg", version="4") == 0


def test_fast_observations_equal_prometheus_observe():
    """metrics' bisection and whole-array observations count exactly as Histogram.observe does."""
    from prometheus_client import CollectorRegistry, Histogram

    from app import metrics

    bounds = (0.1, 0.5, 0.9, 0.99)
    values = [0.05, 0.1, 0.3, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0, 7.0, 0.5, float("nan")]

    def exposition(observe) -> dict:
        histogram = Histogram("h", "h", buckets=bounds, registry=CollectorRegistry())
        observe(histogram)
        return {(s.name, s.labels.get("le")): s.value for family in histogram.collect() for s in family.samples}

    expected = exposition(lambda h: [h.observe(v) for v in values])
    finite = exposition(lambda h: [h.observe(v) for v in values[:-1]])
    assert expected[("h_bucket", "0.5")] == 5 and expected[("h_bucket", "+Inf")] == 11
    assert exposition(lambda h: [metrics._observe(h, v) for v in values[:-1]]) == finite
    one_by_one = exposition(lambda h: metrics._observe_all(h, np.array(values).reshape(3, 4)))
    assert np.isnan(one_by_one.pop(("h_sum", None))) and np.isnan(expected.pop(("h_sum", None)))
    assert one_by_one == expected
    few_at_a_time = exposition(lambda h: [metrics._observe_all(h, np.array(values[i : i + 3])) for i in (0, 3, 6, 9)])
    assert np.isnan(few_at_a_time.pop(("h_sum", None)))
    assert few_at_a_time == expected  # up to metrics._FEW values take the loop


def test_metrics_add_up_across_worker_processes(repository, tmp_path_factory):
    """Two workers (python -m app): whichever answers /metrics reports the requests both served."""
    root = tmp_path_factory.mktemp("workers") / "models"
    shutil.copytree(repository, root)
    server = Server(root, entry="app", workers=2, access_log="false")
    try:
        deadline = time.monotonic() + 180
        while value(scrape(server), "dropout_serve_model_load_seconds_count", model="tiny") < 2:  # both loaded
            assert time.monotonic() < deadline
            time.sleep(0.5)
        for _ in range(40):  # fresh connections, spread over both workers by the kernel
            assert httpx.post(f"{server.url}/predict", json=GOOD).status_code == 200
        for _ in range(4):
            samples = scrape(server)
            served = value(samples, "dropout_serve_requests_total", **{**PREDICT_OK, "model": "tiny"})
            assert served == 40
            pids = {dict(labels)["pid"] for name, labels in samples if name == "process_resident_memory_bytes"}
            assert len(pids) == 2
            assert value(samples, "dropout_serve_predict_top_probability_count", model="tiny", version="1") == 40
    finally:
        assert server.stop() == 0
    log = Path(server.log.name).read_text()
    assert "Application startup complete" in log and "POST /predict" not in log  # DROPOUT_SERVE_ACCESS_LOG=false
