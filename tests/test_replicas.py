"""Three replicas behind HAProxy under steady load: a rolling restart of every replica and a new
model version published to the shared repository cost no request, and a seeded MC request
gets the byte-identical answer from each replica.

Replicas are `python -m app` processes (tests/cluster.py), not containers: podman would add minutes.
HAProxy is Debian's package; .ci/run installs it.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from cluster import HAProxy, Load, Replica, haproxy_binary

from training import export_model

REPLICAS = 3
CONCURRENCY = 16


@pytest.fixture
def cluster(tiny_classifier, digit_rows, tmp_path):
    """A shared repository holding digits version 1, three replicas polling it, HAProxy in front."""
    haproxy_binary()  # before spending a minute on replicas
    repository = tmp_path / "models"
    export_model(tiny_classifier.model, repository, "digits", task="classification", class_labels=list("0123456789"))
    replicas = [
        Replica(repository, tmp_path, f"r{i}", default_model="digits", poll_seconds=0.5, tf_threads=1)
        for i in range(REPLICAS)
    ]
    proxy = None
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        proxy = HAProxy(replicas, tmp_path)
        for replica in replicas:
            proxy.wait_up(replica.name)
        yield repository, replicas, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        for replica in replicas:
            if replica.alive():
                replica.stop()


def bodies(rows) -> list[tuple[str, bytes]]:
    """Mixed traffic: one-instance predictions, and seeded MC requests with T = 20."""
    mix = []
    for i, row in enumerate(rows[:8]):
        instance = {"instances": [row.tolist()]}
        mix.append(("/predict", json.dumps(instance).encode()))
        mix.append(("/predict/mc-dropout", json.dumps({**instance, "samples": 20, "seed": i}).encode()))
    return mix


def test_rolling_restart_and_new_version_under_load_lose_nothing(cluster, tiny_classifier, digit_rows):
    repository, replicas, proxy = cluster
    load = Load(proxy.url, bodies(digit_rows), concurrency=CONCURRENCY, max_requests=200_000, max_seconds=600)
    load.start()
    try:
        time.sleep(2)
        for replica in replicas:
            assert replica.stop(), replica.tail()  # uvicorn drained and exited cleanly
            replica.start()
            replica.wait_ready()
            proxy.wait_up(replica.name)
        restarted_at = load.result.requests

        export_model(
            tiny_classifier.model, repository, "digits", task="classification", class_labels=list("0123456789")
        )
        deadline = time.monotonic() + 60
        for replica in replicas:
            while httpx.get(f"{replica.url}/models/digits").json()["latest"] != 2:
                assert time.monotonic() < deadline, f"{replica.name} did not load version 2: {replica.tail()}"
                time.sleep(0.2)
        time.sleep(2)
    finally:
        result = load.stop()

    print(
        f"\n{result.requests} requests in {result.seconds:.1f} s ({result.throughput:.0f}/s), "
        f"{restarted_at} before the new version; statuses {dict(result.statuses)}, versions {dict(result.versions)}"
    )
    assert result.failures == 0, f"statuses {dict(result.statuses)}, errors {dict(result.errors)}"
    assert result.versions[1] > 0 and result.versions[2] > 0
    assert result.requests > restarted_at > 100

    # The same seeded MC request, to each replica directly and through the proxy: identical bytes.
    body = {"instances": [row.tolist() for row in digit_rows[:4]], "samples": 100, "seed": 42}
    answers = [httpx.post(f"{r.url}/predict/mc-dropout", json=body).content for r in replicas]
    answers.append(httpx.post(f"{proxy.url}/predict/mc-dropout", json=body).content)
    assert json.loads(answers[0])["version"] == 2
    assert all(answer == answers[0] for answer in answers)
