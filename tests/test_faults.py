"""Faults a deployment meets: SIGTERM under load, an unreadable model repository, clients that hang up."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import Server, slow_body

from app.schemas import DIGIT_ZERO

GOOD = {"instances": [DIGIT_ZERO]}
HEAVY = {"instances": [DIGIT_ZERO] * 20, "samples": 5000, "seed": 1}


@pytest.fixture(scope="module")
def repository(tiny_classifier_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "models"
    shutil.copytree(tiny_classifier_dir, root / "tiny" / "1")
    return root


def in_flight(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("dropout_serve_requests_in_flight "):
            return float(line.split()[1]) - 1  # minus the scrape itself
    raise AssertionError("no in-flight gauge")


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_0(repository):
    server = Server(repository, entry="app")
    outcomes: list[object] = []

    def call(kind: str) -> None:
        try:
            if kind == "slow":
                response = httpx.post(f"{server.url}/predict", **slow_body(3.0), timeout=60)
            else:
                response = httpx.post(f"{server.url}/predict/mc-dropout", json=HEAVY, timeout=60)
            outcomes.append((kind, response.status_code))
        except httpx.TransportError as error:
            outcomes.append((kind, repr(error)))

    slow = [threading.Thread(target=call, args=("slow",)) for _ in range(4)]
    for thread in slow:
        thread.start()
    deadline = time.monotonic() + 30
    while in_flight(server) < 4:  # their bodies take 3 s to arrive
        assert time.monotonic() < deadline
        time.sleep(0.05)
    load = [threading.Thread(target=call, args=("mc",)) for _ in range(12)]
    for thread in load:
        thread.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the slow requests are still coming in
    with pytest.raises(httpx.ConnectError):  # a new connection while draining: refused at once
        httpx.get(f"{server.url}/health/live", timeout=5)
    for thread in slow + load:
        thread.join()
    assert server.process.wait(timeout=60) == 0
    server.log.close()
    assert sorted(o for o in outcomes if o[0] == "slow") == [("slow", 200)] * 4  # all in flight at SIGTERM
    # MC requests racing the signal: answered, or never started (refused, or reset before the server read
    # them); every request the server started was answered in full.
    answered = sum(1 for kind, status in outcomes if kind == "mc" and status == 200)
    assert len(outcomes) == 16
    log = Path(server.log.name).read_text()
    assert log.count("POST /predict/mc-dropout ") == log.count("POST /predict/mc-dropout 200 ") == answered
    assert "Finished server process" in log and "Traceback" not in log


def without_root_file_access() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (prctl PR_CAPBSET_DROP), so root obeys file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_repository_logs_clearly_and_serves_not_ready(tiny_classifier_dir):
    """A mode-000 repository; a root test run drops root's power to read it anyway."""
    base = Path(tempfile.mkdtemp(prefix="unreadable-"))
    try:
        base.chmod(0o755)
        repository = base / "models"
        shutil.copytree(tiny_classifier_dir, repository / "tiny" / "1")
        repository.chmod(0o000)
        server = Server(
            repository, poll_seconds=0.2, preexec_fn=without_root_file_access if os.geteuid() == 0 else None
        )
        try:
            assert httpx.get(f"{server.url}/health/live").status_code == 200
            ready = httpx.get(f"{server.url}/health/ready")
            assert ready.status_code == 503 and ready.json()["models"] == 0
            response = httpx.post(f"{server.url}/predict", json=GOOD)
            assert response.status_code == 404 and "no models are loaded" in response.json()["detail"]
            time.sleep(1)  # a few rescans
            assert server.process.poll() is None
        finally:
            server.stop()
        log = Path(server.log.name).read_text()
        assert f"cannot read the model repository {repository} ([Errno 13] Permission denied" in log
        assert log.count("cannot read the model repository") == 1  # not at every rescan
        assert "Traceback" not in log
    finally:
        (base / "models").chmod(0o755)
        shutil.rmtree(base)


def raw_request(server: Server, body: bytes, send: int | None = None) -> None:
    """Send a POST to the MC endpoint, at most ``send`` bytes of its body, and hang up without reading."""
    head = (
        f"POST /predict/mc-dropout HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(head + body[:send])
        time.sleep(0.1)


def test_clients_hanging_up_mid_request_leave_no_work_behind(repository):
    server = Server(repository)
    try:
        body = json.dumps(HEAVY).encode()
        for _ in range(3):
            raw_request(server, body)  # whole body sent, the answer never read
            raw_request(server, body, send=len(body) // 2)  # cut inside the body
        deadline = time.monotonic() + 30
        while in_flight(server) != 0:
            assert time.monotonic() < deadline, "requests of departed clients are still in flight"
            time.sleep(0.2)
        assert httpx.post(f"{server.url}/predict", json=GOOD).status_code == 200
        assert httpx.post(f"{server.url}/predict/mc-dropout", json={**GOOD, "samples": 10}).status_code == 200
        assert server.process.poll() is None
    finally:
        server.stop()
    log = Path(server.log.name).read_text()
    assert "Traceback" not in log and " 500 " not in log
    assert log.count("POST /predict/mc-dropout 499 ") == 3  # the bodies cut short: logged, not errors
