"""Shared fixtures: real models, trained for seconds, exported through the real code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests start many servers side by side, in-process and as processes: the gRPC port (default 8001)
# is off unless a test gives one (tests/test_grpc.py gives its servers free ports).
os.environ["DROPOUT_SERVE_GRPC_PORT"] = "0"


def run_training(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m training ...`` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "training", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory) -> Path:
    """A model repository holding the default digits model, trained with the default settings."""
    repository = tmp_path_factory.mktemp("artifacts")
    result = run_training("--artifacts", repository)
    assert result.returncode == 0, result.stderr[-3000:]
    return repository


@pytest.fixture(scope="session")
def tiny_classifier():
    """A small digits classifier trained for a few epochs (in-process, so tests can compare)."""
    from training.data import digits
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    return train(digits(), ModelConfig(hidden=(32, 16)), TrainConfig(epochs=3, mc_samples=20))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_classifier, tmp_path_factory) -> Path:
    from training import export_model

    repository = tmp_path_factory.mktemp("tiny")
    return export_model(
        tiny_classifier.model, repository, "tiny", task="classification", class_labels=list("0123456789")
    )


@pytest.fixture(scope="session")
def calibrated_classifier_dir(tiny_classifier, tmp_path_factory) -> Path:
    """The tiny classifier exported with its held-out calibration rows (T = 30, seed 5) and temperatures."""
    from training import conformity, export_model

    rows = tiny_classifier.calibration
    return export_model(
        tiny_classifier.model,
        tmp_path_factory.mktemp("calibrated"),
        "tiny",
        task="classification",
        class_labels=list("0123456789"),
        temperature=tiny_classifier.temperature,
        predictive_temperature=tiny_classifier.predictive_temperature,
        calibration=conformity.CalibrationRows(rows.x, rows.y, source="test rows", samples=30, seed=5),
    )


@pytest.fixture(scope="session")
def confident_classifier():
    """A digits classifier trained long enough to be sure of most digits (about 97 % test accuracy, 30 s),
    calibrated: sure digits settle in a few MC samples, unfamiliar inputs do not."""
    from training.data import digits
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    return train(digits(), ModelConfig(hidden=(64, 32)), TrainConfig(epochs=40, mc_samples=20))


@pytest.fixture(scope="session")
def confident_classifier_dir(confident_classifier, tmp_path_factory) -> Path:
    from training import export_model

    trained = confident_classifier
    return export_model(
        trained.model,
        tmp_path_factory.mktemp("confident"),
        "digits",
        task="classification",
        temperature=trained.temperature,
        predictive_temperature=trained.predictive_temperature,
    )


@pytest.fixture(scope="session")
def digit_rows() -> np.ndarray:
    from training.data import digits

    return digits().x[:16]


def free_port() -> int:
    """A loopback port nothing listens on now (for a server's gRPC port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real service process on a free loopback port: ``uvicorn app.main:app``, or with
    ``entry="app"`` the production entry ``python -m app`` (host and port from the settings);
    ``preexec_fn`` runs in the child before the exec (to drop privileges)."""

    def __init__(self, model_dir: Path, *, preexec_fn=None, entry: str = "uvicorn", **settings: object) -> None:
        import os
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = int(settings.get("grpc_port", 0))
        env = {**os.environ, "DROPOUT_SERVE_MODEL_DIR": str(model_dir)}
        env.update({f"DROPOUT_SERVE_{k.upper()}": str(v) for k, v in settings.items()})
        command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)]
        if entry == "app":
            command = [sys.executable, "-m", "app"]
            env.update(DROPOUT_SERVE_HOST="127.0.0.1", DROPOUT_SERVE_PORT=str(self.port))
        self.log = open(model_dir.parent / f"uvicorn-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
        )
        self.wait_until_up()

    def wait_until_up(self, timeout: float = 120) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                httpx.get(f"{self.url}/health/live", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError(f"uvicorn did not start: {Path(self.log.name).read_text()[-3000:]}")

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=30)
        self.log.close()
        return code


def versioned_model(value: float):
    """A tiny regression model whose every answer is ``value``, with a dropout layer for MC.

    Publishing ``versioned_model(v)`` as version ``v`` lets a test tell from any answer which
    version produced it.
    """
    import keras

    inputs = keras.Input((4,))
    hidden = keras.layers.Dropout(0.2)(inputs)
    outputs = keras.layers.Dense(1, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(value))(
        hidden
    )
    return keras.Model(inputs, outputs)


def publish_versions(repository: Path, name: str, count: int) -> list[Path]:
    """Versions 1..count of ``name``, each answering its own number, exported through the real path."""
    from training import export_model

    return [export_model(versioned_model(v), repository, name, task="regression") for v in range(1, count + 1)]


def slow_body(seconds: float) -> dict:
    """httpx arguments for a /predict body that takes ``seconds`` to arrive, so its request stays in
    progress that long."""
    from app.schemas import DIGIT_ZERO

    text = json.dumps({"instances": [DIGIT_ZERO]}).encode()

    def chunks():
        yield text[:10]
        time.sleep(seconds)
        yield text[10:]

    return {"content": chunks(), "headers": {"content-type": "application/json"}}
