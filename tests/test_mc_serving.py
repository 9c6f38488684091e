"""MC batching and samples "auto" through a real server: replay stays exact, auto stops when settled."""

from __future__ import annotations

import asyncio
import re
import shutil

import httpx
import numpy as np
import pytest
import tensorflow as tf
from conftest import Server

from training import artifact
from training.adaptive import classification_error
from training.data import digits
from training.mc_dropout import sample

ROWS = digits().x[:40]
NOISE = np.random.default_rng(3).uniform(0, 16, size=(2, 64)).round(2)


@pytest.fixture(scope="module")
def repository(confident_classifier_dir, tmp_path_factory):
    """The calibrated digits classifier, and the same model as an artifact from before mc_dropout_segments."""
    root = tmp_path_factory.mktemp("mc-serving") / "models"
    shutil.copytree(confident_classifier_dir, root / "digits" / "1")
    loaded = tf.saved_model.load(str(confident_classifier_dir))
    old = {name: loaded.signatures[name] for name in (artifact.SERVING_SIGNATURE, artifact.MC_SIGNATURE)}
    tf.saved_model.save(loaded, str(root / "old" / "1"), signatures=old)
    shutil.copy(confident_classifier_dir / artifact.METADATA_FILE, root / "old" / "1")
    return root


@pytest.fixture(scope="module")
def server(repository):
    server = Server(repository, default_model="digits", max_mc_rows=20_000, auto_max_samples=400)
    yield server
    server.stop()


def mc(url: str, body: dict, model: str = "digits") -> httpx.Response:
    return httpx.post(f"{url}/predict/mc-dropout", json={"model": model, **body}, timeout=120)


async def concurrently(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/predict/mc-dropout", json=body) for body in bodies))


def others(count: int) -> list[dict]:
    """Seeded MC requests of other seeds, T (some "auto") and instance counts."""
    bodies = []
    for i in range(count):
        rows = ROWS[i % 30 : i % 30 + 1 + i % 4].tolist()
        samples = "auto" if i % 4 == 3 else [10, 37, 100, 250][i % 4] + i
        bodies.append({"instances": rows, "samples": samples, "seed": 1000 + i})
    return bodies


def mc_batches(url: str) -> float:
    """How many MC calls of the digits model held more than one stretch (the batching histogram)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    count = re.search(r'dropout_serve_mc_batch_requests_count\{model="digits",version="1"\} (\S+)', text)
    alone = re.search(r'dropout_serve_mc_batch_requests_bucket\{le="1.0",model="digits",version="1"\} (\S+)', text)
    assert count and alone, text[:2000]
    return float(count.group(1)) - float(alone.group(1))


@pytest.mark.parametrize(
    "target",
    [
        {"instances": ROWS[:3].tolist(), "samples": 100, "seed": 42},
        {"instances": [ROWS[7].tolist(), NOISE[0].tolist()], "samples": "auto", "seed": 43},
    ],
)
def test_a_seeded_answer_is_byte_identical_alone_and_beside_31_concurrent_requests(server, repository, target):
    alone = mc(server.url, target)
    assert alone.status_code == 200, alone.text
    batched_before = mc_batches(server.url)
    bodies = others(31)
    bodies.insert(13, target)
    answers = asyncio.run(concurrently(server.url, bodies))
    assert [a.status_code for a in answers] == [200] * 32, [a.text for a in answers if a.status_code != 200]
    assert mc_batches(server.url) > batched_before  # some calls did hold several requests
    assert answers[13].content == alone.content
    unbatched = Server(repository, default_model="digits", auto_max_samples=400, mc_batch_rows=1, mc_threads=1)
    try:  # another process, where every request runs alone
        assert mc(unbatched.url, target).content == alone.content
    finally:
        unbatched.stop()


def test_an_artifact_from_before_mc_dropout_segments_still_serves_mc(server, repository):
    body = {"instances": ROWS[:2].tolist(), "samples": 60, "seed": 5}
    old, new = mc(server.url, body, "old"), mc(server.url, body)
    assert old.status_code == new.status_code == 200, old.text + new.text
    for a, b in zip(old.json()["predictions"], new.json()["predictions"], strict=True):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=0, atol=1e-6)  # float32 in-graph
        assert a["std"] == b["std"]  # the same draws
    auto = {"instances": [ROWS[7].tolist(), NOISE[0].tolist()], "samples": "auto", "seed": 9}
    old_auto, new_auto = mc(server.url, auto, "old"), mc(server.url, auto)
    assert old_auto.status_code == new_auto.status_code == 200, old_auto.text
    used = [[p["samples_used"] for p in r.json()["predictions"]] for r in (old_auto, new_auto)]
    assert used[0] == used[1]
    # auto draws in stretches, which keep no in-graph predictive: the old artifact's is recomputed, calibrated.
    temperature = artifact.read_metadata(repository / "old" / "1").predictive_temperature
    assert temperature is not None and abs(temperature - 1) > 0.05, temperature
    for a, b in zip(old_auto.json()["predictions"], new_auto.json()["predictions"], strict=True):
        assert a["probabilities"] == b["probabilities"]


def test_auto_reports_t_per_prediction_stops_early_when_sure_and_replays(server, confident_classifier):
    # Sure under MC dropout (the most settled of 100 samples with another seed), not just in inference mode:
    # with dropout 0.5 on 64 and 32 units, inference's surest digit can still swing from sample to sample.
    trained = confident_classifier
    errors = classification_error(sample(trained.model, ROWS, 100, seed=1), trained.predictive_temperature)
    sure = ROWS[np.argmin(errors)]
    instances = [sure.tolist(), *NOISE.tolist(), (16 - sure).tolist()]
    body = {"instances": instances, "samples": "auto", "seed": 7}
    first, again = mc(server.url, body), mc(server.url, body)
    assert first.status_code == again.status_code == 200, first.text
    assert first.content == again.content
    answer = first.json()
    used = [p["samples_used"] for p in answer["predictions"]]
    assert answer["tolerance"] == 0.05 and answer["samples"] == max(used) and all(10 <= t <= 400 for t in used)
    assert used[0] <= 50 and min(used[1:]) >= 4 * used[0], used
    for i, t in enumerate(used):  # an instance's auto answer is its answer with samples: T, the same seed
        fixed = mc(server.url, {"instances": [instances[i]], "samples": t, "seed": 7})
        assert fixed.status_code == 200
        alone = mc(server.url, {"instances": [instances[i]], "samples": "auto", "seed": 7}).json()["predictions"][0]
        assert fixed.json()["predictions"][0] == {k: v for k, v in alone.items() if k != "samples_used"}
        # The same T and draws beside the request's other instances (NumPy's sums round by the array's shape).
        beside = answer["predictions"][i]
        assert alone.keys() == beside.keys() and alone["label"] == beside["label"]
        for key in alone.keys() - {"label"}:
            np.testing.assert_allclose(alone[key], beside[key], rtol=1e-12, atol=1e-15, err_msg=key)
    loose = mc(server.url, {**body, "tolerance": 0.5}).json()
    assert loose["tolerance"] == 0.5
    loose_used = [p["samples_used"] for p in loose["predictions"]]
    assert min(loose_used) == 10 and sum(loose_used) < sum(used), (loose_used, used)  # a looser tolerance stops sooner


def test_auto_in_v2_parameters(server):
    request = {
        "inputs": [{"name": "inputs", "shape": [2, 64], "datatype": "FP32", "data": ROWS[:2].ravel().tolist()}],
        "parameters": {"mc_dropout": True, "samples": "auto", "seed": 3, "tolerance": 0.1},
    }
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=request, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["samples_used"]["datatype"] == "INT64" and outputs["samples_used"]["shape"] == [2]
    assert answer["parameters"]["tolerance"] == 0.1
    assert answer["parameters"]["samples"] == max(outputs["samples_used"]["data"])
    native = mc(server.url, {"instances": ROWS[:2].tolist(), "samples": "auto", "seed": 3, "tolerance": 0.1})
    assert [p["samples_used"] for p in native.json()["predictions"]] == outputs["samples_used"]["data"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"samples": "many"}, "samples"),
        ({"samples": "auto", "tolerance": 0}, "tolerance"),
        ({"samples": "auto", "tolerance": 1.5}, "tolerance"),
        ({"samples": "auto", "tolerance": "low"}, "tolerance"),
        ({"samples": 20, "tolerance": 0.1}, "tolerance"),
        ({"samples": "auto", "return_samples": True}, "return_samples"),
    ],
)
def test_bad_auto_values_are_a_422_naming_the_field(server, body, field):
    response = mc(server.url, {"instances": ROWS[:1].tolist(), **body})
    assert response.status_code == 422, response.text
    assert field in response.text
    v2 = {k: v for k, v in body.items() if k != "return_samples"}
    if v2 != body:
        return
    request = {
        "inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": ROWS[0].tolist()}],
        "parameters": {"mc_dropout": True, **v2},
    }
    answer = httpx.post(f"{server.url}/v2/models/digits/infer", json=request, timeout=60)
    assert answer.status_code == 400 and f"parameters.{field}" in answer.text, answer.text
