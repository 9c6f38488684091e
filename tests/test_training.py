"""Training from the command line: the default digits model, user files, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_training
from sklearn.datasets import load_diabetes

from training import artifact


def test_default_run_publishes_an_accurate_digits_model(digits_repository):
    version_dir = digits_repository / "digits" / "1"
    meta = artifact.read_metadata(version_dir)
    assert meta.task == "classification" and meta.class_labels == [str(d) for d in range(10)]
    assert meta.input_shape == [64] and meta.output_shape == [10]
    assert meta.temperature is not None and meta.predictive_temperature is not None  # calibrated by default
    assert [(d.type, d.rate) for d in meta.dropout_layers] == [("Dropout", 0.5), ("Dropout", 0.5)]
    assert meta.metrics["test_deterministic"]["accuracy"] >= 0.95
    signatures = set(tf.saved_model.load(str(version_dir)).signatures)
    assert signatures == {"serving_default", "mc_dropout", "mc_dropout_segments"}


def test_if_missing_does_not_train_again(digits_repository):
    result = run_training("--artifacts", digits_repository, "--if-missing")
    assert result.returncode == 0 and "not training" in result.stdout
    assert artifact.versions(digits_repository / "digits") == [1]


def test_training_is_deterministic_for_a_seed():
    from training.data import digits
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    runs = [train(digits(), ModelConfig(hidden=(16,)), TrainConfig(epochs=2, seed=4, mc_samples=5)) for _ in range(2)]
    for a, b in zip(runs[0].model.get_weights(), runs[1].model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0].metrics == runs[1].metrics


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory):
    bunch = load_diabetes(scaled=False)
    path = tmp_path_factory.mktemp("data") / "diabetes.csv"
    header = ",".join([*bunch.feature_names, "progression"])
    rows = np.column_stack([bunch.data, bunch.target])
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%.6g")
    return path


def test_regression_from_csv_keeps_scaling_in_the_graph(diabetes_csv, tmp_path):
    result = run_training("--data", diabetes_csv, "--target", "progression", "--artifacts", tmp_path, "--epochs", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    meta = artifact.read_metadata(tmp_path / "diabetes" / "1")
    assert meta.task == "regression" and meta.tau > 0 and meta.target_names == ["progression"]
    assert meta.preprocessing.target_scale[0] > 10  # the target was standardized for training
    rows = np.loadtxt(diabetes_csv, delimiter=",", skiprows=1)
    loaded = tf.saved_model.load(str(tmp_path / "diabetes" / "1"))
    predicted = loaded.signatures["serving_default"](inputs=tf.constant(rows[:, :-1], tf.float32))["outputs"].numpy()
    assert 100 < predicted.mean() < 200  # raw features in, target units out
    assert np.corrcoef(predicted[:, 0], rows[:, -1])[0, 1] > 0.5


def test_npz_input_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3)).astype(np.float32)
    np.savez(tmp_path / "blobs.npz", x=x, y=(x[:, 0] > 0).astype(int))
    result = run_training("--data", tmp_path / "blobs.npz", "--artifacts", tmp_path / "repo", "--epochs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "repo" / "blobs" / "1" / "metadata.json").read_text())["class_labels"] == [
        "0",
        "1",
    ]


def write(path, text):
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing target column": (
        lambda d: ["--data", write(d / "a.csv", "x,y\n1,2\n3,4\n"), "--target", "label"],
        "no target column 'label'; columns are x, y",
    ),
    "NaN in data": (
        lambda d: ["--data", write(d / "b.csv", "x,label\n1,0\nnan,1\n2,1\n"), "--target", "label"],
        "NaN or infinite values in 1 row(s) (0-based: 1)",
    ),
    "text in a feature": (
        lambda d: ["--data", write(d / "c.csv", "x,label\n1,0\nabc,1\n"), "--target", "label"],
        "line 3: column 'x' is not a number",
    ),
    "ragged CSV": (
        lambda d: ["--data", write(d / "d.csv", "x,label\n1,0\n2\n"), "--target", "label"],
        "line 3: 1 fields, the header has 2",
    ),
    "no such file": (lambda d: ["--data", d / "missing.csv", "--target", "y"], "no such file"),
    "wrong file type": (lambda d: ["--data", write(d / "e.txt", "1 2 3")], "unsupported file type '.txt'"),
    "corrupt npz": (lambda d: ["--data", write(d / "f.npz", "not a zip")], "not a readable .npz file"),
    "npz without y": (lambda d: ["--data", d / "g.npz"], "missing array(s) y"),
    "bad model name": (lambda d: ["--name", "../escape"], "invalid model name"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_training_input_stops_cleanly(case, tmp_path):
    np.savez(tmp_path / "g.npz", x=np.zeros((4, 2)))
    args, message = BAD_INPUTS[case]
    repository = tmp_path / "repo"
    result = run_training(*args(tmp_path), "--artifacts", repository)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    leftovers = [p for p in repository.rglob("*")] if repository.exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_help_lists_the_training_options(capsys):
    from training.__main__ import main

    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for option in ("{train,import,uci,evaluate}", "--epochs", "--dropout", "--hidden", "--seed", "--likelihood"):
        assert option in shown
    assert "--calibrate" in shown


def _disk_full(monkeypatch):
    """The SavedModel is half written when the disk fills up."""

    def save(obj, export_dir, signatures=None):
        (Path(export_dir) / "variables").mkdir(parents=True)
        (Path(export_dir) / "saved_model.pb").write_bytes(b"\x08\x01partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", save)
    return {}


def _interrupted(monkeypatch):
    """Ctrl-C after the SavedModel is written, while the metadata is being written."""
    real_save = tf.saved_model.save

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", save)
    return {}


EXPORT_FAILURES = {
    "disk full while writing the SavedModel": _disk_full,
    "interrupted after the SavedModel": _interrupted,
    "metadata that cannot be written": lambda monkeypatch: {"training": {"callback": object()}},
}


@pytest.mark.parametrize("case", EXPORT_FAILURES)
def test_a_failed_export_leaves_no_version_and_no_staging_folder(case, tiny_classifier, tiny_classifier_dir, tmp_path):
    from training import export_model

    repository = tmp_path / "repo"
    shutil.copytree(tiny_classifier_dir, repository / "tiny" / "1")
    with pytest.MonkeyPatch.context() as monkeypatch:
        extra = EXPORT_FAILURES[case](monkeypatch)
        with pytest.raises((OSError, KeyboardInterrupt, ValueError, TypeError)):
            export_model(tiny_classifier.model, repository, "tiny", task="classification", **extra)
    assert sorted(p.name for p in (repository / "tiny").iterdir()) == ["1"]  # no version 2, no .staging-*
    assert export_model(tiny_classifier.model, repository, "tiny", task="classification").name == "2"
