"""Shared fixtures: real models, trained for seconds, exported through the real code path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


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
def digit_rows() -> np.ndarray:
    from training.data import digits

    return digits().x[:16]
