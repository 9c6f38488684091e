"""The gRPC port's life: health follows the default model, SIGTERM drains calls, and the limits hold
(MAX_IN_FLIGHT, REQUEST_TIMEOUT, MAX_BODY_BYTES), each on a real server of its own."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_grpc import status_of, triton_input
from tritonclient.utils import InferenceServerException


def test_health_serving_once_the_default_model_loads_and_sigterm_drains_calls(tiny_classifier_dir, tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    port = free_port()
    # python -m app, as deployed; a large MC call (T x rows = 10,000,000, seconds long) is still running at SIGTERM.
    server = Server(repository, entry="app", grpc_port=port, default_model="tiny", poll_seconds=0.5, max_mc_rows=10**7)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest
        assert health.Check(check()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(check(service="live")).status == health_pb2.HealthCheckResponse.SERVING
        shutil.copytree(tiny_classifier_dir, repository / "tiny" / "1")
        deadline = time.monotonic() + 60
        while health.Check(check()).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the default model did not load within 60 s"
            time.sleep(0.25)
        assert httpx.get(f"{server.url}/health/ready").status_code == 200

        triton = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        answers: list = []
        done = threading.Event()
        parameters = {"mc_dropout": True, "samples": 10_000, "seed": 1}
        x = triton_input(np.zeros((1000, 64), np.float32))

        def callback(result, error) -> None:
            answers.append((result, error))
            done.set()

        triton.async_infer("tiny", [x], callback, parameters=parameters)
        time.sleep(1)
        assert server.stop() == 0  # SIGTERM, and the process ends cleanly
        assert done.wait(60)
        triton.close()
    ((result, error),) = answers
    assert error is None and result.as_numpy("probabilities").shape == (1000, 10)
    log = Path(server.log.name).read_text()
    shutdown = log.index("Shutting down")
    assert log.index("GRPC /inference.GRPCInferenceService/ModelInfer 200", shutdown) > shutdown


def test_overload_deadline_and_message_size(tiny_classifier_dir, tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(tiny_classifier_dir, repository / "tiny" / "1")
    port = free_port()
    server = Server(repository, grpc_port=port, max_in_flight=1, request_timeout=1, max_mc_rows=10**7)
    triton = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        answers: list = []
        parameters = {"mc_dropout": True, "samples": 10_000, "seed": 1}  # seconds of work, past the 1 s deadline
        x = triton_input(np.zeros((1000, 64), np.float32))
        triton.async_infer("tiny", [x], lambda result, error: answers.append(error), parameters=parameters)
        refused = None
        deadline = time.monotonic() + 1
        while refused is None and time.monotonic() < deadline:  # while the long call holds the only slot
            try:
                triton.is_server_live()
            except InferenceServerException as error:
                refused = error
            time.sleep(0.01)
        assert refused is not None and status_of(refused) == "RESOURCE_EXHAUSTED"
        assert "DROPOUT_SERVE_MAX_IN_FLIGHT" in refused.message()
        deadline = time.monotonic() + 30
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status_of(answers[0]) == "DEADLINE_EXCEEDED" and "DROPOUT_SERVE_REQUEST_TIMEOUT" in answers[0].message()
        big = triton_input(np.zeros((20_000, 64), np.float32))  # 5.1 MB, over the 4 MiB DROPOUT_SERVE_MAX_BODY_BYTES
        with pytest.raises(InferenceServerException) as too_large:
            triton.infer("tiny", [big])
        assert status_of(too_large.value) == "RESOURCE_EXHAUSTED"
        assert triton.is_server_live()  # and the server keeps serving
    finally:
        triton.close()
        server.stop()


def test_workers_share_the_grpc_port(tiny_classifier_dir, tmp_path):
    """python -m app with two workers: both bind the gRPC port (SO_REUSEPORT) and new connections reach both."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    repository = tmp_path / "models"
    shutil.copytree(tiny_classifier_dir, repository / "tiny" / "1")
    port = free_port()
    server = Server(repository, entry="app", workers=2, grpc_port=port)
    try:
        workers: set[str] = set()
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # a new connection each time
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest(), timeout=10)
            workers.add(dict(call.trailing_metadata())["x-request-id"][:16])  # generated ids start per process
        assert len(workers) == 2
    finally:
        assert server.stop() == 0
