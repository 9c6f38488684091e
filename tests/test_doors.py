"""Every door gives the same answer and the same meaning of failure for the same request.

One matrix of good and bad requests goes through each door on a real server with a tiny trained
model. A door is an object with ``predict`` and ``mc`` that speaks its own wire format and returns a
normalized ``Answer``: ``kind`` ("ok", "invalid_argument", "not_found", "forbidden", "unavailable")
and either the numbers (ok) or the error message. More doors (gRPC v2, gRPC TF Serving) join by
adding a class to ``DOORS``: each gets the running ``Server`` and answers the same matrix.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Server

from training.uncertainty import summarize_classification

MAX_INSTANCES = 8
MODEL = "tiny"
KIND_OF_STATUS = {
    400: "invalid_argument",
    422: "invalid_argument",
    403: "forbidden",
    404: "not_found",
    503: "unavailable",
}


@dataclass
class Answer:
    kind: str
    payload: Any
    """ok: ``{"probabilities": [N, K], ...}`` as float64 arrays (MC: also mutual_information, samples,
    seed); otherwise the error message."""


def _failure(response: httpx.Response, key: str) -> Answer:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return Answer(KIND_OF_STATUS.get(response.status_code, f"status {response.status_code}"), response.json()[key])


class NativeDoor:
    name = "native"

    def __init__(self, server: Server) -> None:
        self.client = httpx.Client(base_url=server.url, timeout=60)

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        # json.dumps writes NaN as the literal NaN, as many clients do
        return self.client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

    def predict(self, rows: list, model: str | None = None, version: int | None = None) -> Answer:
        body = {"instances": rows, **({"model": model} if model else {}), **({"version": version} if version else {})}
        response = self._post("/predict", body)
        if response.status_code != 200:
            return _failure(response, "detail")
        predictions = response.json()["predictions"]
        return Answer("ok", {"probabilities": np.array([p["probabilities"] for p in predictions])})

    def mc(self, rows: list, samples: Any = None, seed: Any = None, model: str | None = None) -> Answer:
        body: dict[str, Any] = {"instances": rows, **({"model": model} if model else {})}
        body.update({k: v for k, v in (("samples", samples), ("seed", seed)) if v is not None})
        response = self._post("/predict/mc-dropout", body)
        if response.status_code != 200:
            return _failure(response, "detail")
        answer = response.json()
        predictions = answer["predictions"]
        return Answer(
            "ok",
            {
                "probabilities": np.array([p["probabilities"] for p in predictions]),
                "mutual_information": np.array([p["mutual_information"] for p in predictions]),
                "samples": answer["samples"],
                "seed": answer["seed"],
            },
        )


class TFServingDoor:
    """TF Serving REST: row format for predict, the ``mc_dropout`` signature (raw samples) for MC."""

    name = "tfserving"

    def __init__(self, server: Server) -> None:
        self.client = httpx.Client(base_url=server.url, timeout=60)

    def _post(self, model: str | None, version: int | None, body: dict[str, Any]) -> httpx.Response:
        path = f"/v1/models/{model or MODEL}" + (f"/versions/{version}" if version else "") + ":predict"
        return self.client.post(path, content=json.dumps(body))

    def predict(self, rows: list, model: str | None = None, version: int | None = None) -> Answer:
        response = self._post(model, version, {"instances": rows})
        if response.status_code != 200:
            return _failure(response, "error")
        return Answer("ok", {"probabilities": np.array(response.json()["predictions"])})

    def mc(self, rows: list, samples: Any = None, seed: Any = None, model: str | None = None) -> Answer:
        inputs = {"inputs": rows, "samples": samples, "seed": seed}
        response = self._post(model, None, {"signature_name": "mc_dropout", "inputs": inputs})
        if response.status_code != 200:
            return _failure(response, "error")
        outputs = response.json()["outputs"]
        draws, predictive = (
            (outputs["outputs"], outputs.get("predictive")) if isinstance(outputs, dict) else (outputs, None)
        )
        summary = summarize_classification(np.array(draws), None if predictive is None else np.array(predictive))
        return Answer(
            "ok",
            {
                "probabilities": summary.mean,
                "mutual_information": summary.mutual_information,
                "samples": samples,
                "seed": seed,
            },
        )


class V2Door:
    """Open Inference Protocol REST, with the rows as binary FP32 data (what tritonclient sends)."""

    name = "v2"

    def __init__(self, server: Server) -> None:
        self.client = httpx.Client(base_url=server.url, timeout=60)

    def _infer(self, rows: list, model: str | None, version: int | None, parameters: dict | None) -> httpx.Response:
        data = np.asarray(rows, dtype=np.float32)
        tensor = {"name": "inputs", "shape": list(data.shape), "datatype": "FP32"}
        tensor["parameters"] = {"binary_data_size": data.nbytes}
        header = json.dumps({"inputs": [tensor], **({"parameters": parameters} if parameters else {})}).encode()
        path = f"/v2/models/{model or MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
        headers = {"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"}
        return self.client.post(path, content=header + data.tobytes(), headers=headers)

    def predict(self, rows: list, model: str | None = None, version: int | None = None) -> Answer:
        response = self._infer(rows, model, version, None)
        if response.status_code != 200:
            return _failure(response, "error")
        output = response.json()["outputs"][0]
        return Answer("ok", {"probabilities": np.array(output["data"], np.float64).reshape(output["shape"])})

    def mc(self, rows: list, samples: Any = None, seed: Any = None, model: str | None = None) -> Answer:
        parameters = {"mc_dropout": True, **{k: v for k, v in (("samples", samples), ("seed", seed)) if v is not None}}
        response = self._infer(rows, model, None, parameters)
        if response.status_code != 200:
            return _failure(response, "error")
        answer = response.json()
        tensors = {o["name"]: np.array(o["data"], np.float64).reshape(o["shape"]) for o in answer["outputs"]}
        return Answer(
            "ok",
            {
                "probabilities": tensors["probabilities"],
                "mutual_information": tensors["mutual_information"],
                "samples": answer["parameters"]["samples"],
                "seed": answer["parameters"]["seed"],
            },
        )


DOORS = [NativeDoor, TFServingDoor, V2Door]


@pytest.fixture(scope="module")
def rows(digit_rows) -> list[list[float]]:
    return digit_rows[:3].tolist()


@pytest.fixture(scope="module")
def servers(tiny_classifier_dir):
    repository = tiny_classifier_dir.parents[1]
    on = Server(repository, max_instances=MAX_INSTANCES, max_samples=500, access_log="false")
    off = Server(repository, max_instances=MAX_INSTANCES, mc_dropout_enabled="false", access_log="false")
    yield {"on": on, "off": off}
    on.stop()
    off.stop()


def _nan_rows(rows: list) -> list:
    bad = [list(row) for row in rows]
    bad[1][5] = float("nan")
    return bad


CASES: dict[str, tuple[str, Any, str, str | None]] = {
    # name: (server, call(door, rows), expected kind, a word every door's message has)
    "predict": ("on", lambda door, rows: door.predict(rows), "ok", None),
    "predict by version": ("on", lambda door, rows: door.predict(rows, MODEL, 1), "ok", None),
    "mc": ("on", lambda door, rows: door.mc(rows, samples=30, seed=11), "ok", None),
    "unknown model": ("on", lambda door, rows: door.predict(rows, "nope"), "not_found", "unknown model 'nope'"),
    "unknown version": ("on", lambda door, rows: door.predict(rows, MODEL, 7), "not_found", "no loaded version 7"),
    "mc unknown model": ("on", lambda door, rows: door.mc(rows, 30, 11, "nope"), "not_found", "unknown model 'nope'"),
    "wrong shape": ("on", lambda door, rows: door.predict([row[:10] for row in rows]), "invalid_argument", "64"),
    "NaN": ("on", lambda door, rows: door.predict(_nan_rows(rows)), "invalid_argument", "NaN"),
    "too many instances": (
        "on",
        lambda door, rows: door.predict(rows * 3),
        "invalid_argument",
        f"9 given, at most {MAX_INSTANCES} per request",
    ),
    "too many samples": ("on", lambda door, rows: door.mc(rows, 501, 1), "invalid_argument", "at most 500"),
    "negative seed": ("on", lambda door, rows: door.mc(rows, 30, -1), "invalid_argument", "seed"),
    "seed beyond int64": ("on", lambda door, rows: door.mc(rows, 30, 2**63), "invalid_argument", "seed"),
    "MC switched off": ("off", lambda door, rows: door.mc(rows, 30, 11), "forbidden", "switched off"),
    "MC switched off, unknown model": (
        "off",
        lambda door, rows: door.mc(rows, 30, 11, "nope"),
        "forbidden",
        "switched off",
    ),
    "predict with MC switched off": ("off", lambda door, rows: door.predict(rows), "ok", None),
}


@pytest.mark.parametrize("case", CASES)
def test_every_door_gives_the_same_answer(case, servers, rows):
    server_name, call, kind, word = CASES[case]
    server = servers[server_name]
    answers = {door.name: call(door(server), rows) for door in DOORS}
    for name, answer in answers.items():
        assert answer.kind == kind, f"{name}: {answer}"
        if kind != "ok":
            assert word in answer.payload, f"{name}: {answer.payload!r} does not name the problem ({word!r})"
    if kind == "ok":
        reference = answers["native"].payload
        assert reference["probabilities"].shape == (len(rows), 10)
        assert np.allclose(reference["probabilities"].sum(axis=1), 1, atol=1e-5)
        for name, answer in answers.items():
            assert answer.payload.keys() == reference.keys(), name
            for key, value in reference.items():
                np.testing.assert_allclose(answer.payload[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{name}: {key}")


def test_the_servers_keep_serving_after_the_matrix(servers, rows):
    for server in servers.values():
        for door in DOORS:
            assert door(server).predict(rows).kind == "ok"


JSON_DOORS = {  # path -> a good body
    "/predict": lambda rows: {"instances": rows},
    "/predict/mc-dropout": lambda rows: {"instances": rows, "samples": 5, "seed": 1},
    "/v1/models/tiny:predict": lambda rows: {"instances": rows},
    "/v2/models/tiny/infer": lambda rows: {
        "inputs": [{"name": "inputs", "shape": [len(rows), 64], "datatype": "FP32", "data": rows}]
    },
}


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _deep_bodies(rows: list) -> dict[str, list[bytes]]:
    """Per door, bodies nested deep in every kind of field: beyond orjson's 1,024 levels and within them."""
    row = json.dumps(rows[0])
    bodies = {}
    for depth in (900, 3000):
        deep = _nested(depth)
        leaf = row[:-1] + ", " + deep + "]"  # a row whose last value is a deep list
        bodies[depth] = {
            "/predict": [
                f'{{"instances": {deep}}}',
                f'{{"instances": [{leaf}]}}',
                f'{{"instances": [{row}], "model": {deep}}}',
            ],
            "/predict/mc-dropout": [f'{{"instances": [{row}], "seed": {deep}}}', f'{{"instances": [{leaf}]}}'],
            "/v1/models/tiny:predict": [
                f'{{"instances": {deep}}}',
                f'{{"signature_name": {deep}, "instances": [{row}]}}',
                f'{{"signature_name": "mc_dropout", "inputs": {{"inputs": [{row}], "samples": {deep}, "seed": 1}}}}',
            ],
            "/v2/models/tiny/infer": [
                f'{{"id": {deep}, "inputs": []}}',
                f'{{"parameters": {{"seed": {deep}}}, "inputs": []}}',
                '{"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": ' + deep + "}]}",
            ],
            "/v2/repository/index": [f'{{"ready": {deep}}}'],
            "/v2/repository/models/tiny/load": [f'{{"parameters": {deep}}}'],
        }
    return {path: [b.encode() for depth in bodies for b in bodies[depth][path]] for path in bodies[900]}


def test_no_body_nesting_gets_a_5xx_from_any_door(servers, rows):
    client = httpx.Client(base_url=servers["on"].url, timeout=60)
    for path, bodies in _deep_bodies(rows).items():
        for body in bodies:
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (path, body[:80], response.status_code, response.text[:300])
            assert response.json(), path
    assert NativeDoor(servers["on"]).predict(rows).kind == "ok"
    log = Path(servers["on"].log.name).read_text()
    assert "Traceback" not in log and "RecursionError" not in log


@pytest.mark.parametrize("path", JSON_DOORS)
def test_every_json_door_reads_gzip_and_deflate_and_names_other_encodings(servers, rows, path):
    client = httpx.Client(base_url=servers["on"].url, timeout=60)
    body = json.dumps(JSON_DOORS[path](rows)).encode()
    headers = {"content-type": "application/json"}
    plain = client.post(path, content=body, headers=headers)
    assert plain.status_code == 200, plain.text
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        response = client.post(path, content=packed, headers={**headers, "content-encoding": encoding})
        assert response.status_code == 200, (encoding, response.text)
        assert response.json() == plain.json(), encoding
    refused = client.post(path, content=body, headers={**headers, "content-encoding": "br"})
    assert refused.status_code == 415
    assert "Content-Encoding 'br' is not supported" in next(iter(refused.json().values()))
    broken = client.post(path, content=b"not gzip", headers={**headers, "content-encoding": "gzip"})
    assert broken.status_code == 400 and "not valid gzip" in next(iter(broken.json().values()))
    bomb = client.post(path, content=gzip.compress(b" " * 5_000_000), headers={**headers, "content-encoding": "gzip"})
    assert bomb.status_code == 413 and "larger than" in next(iter(bomb.json().values()))
