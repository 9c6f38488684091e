"""``python -m training evaluate``: scores, OOD AUROC and plots, through the exported SavedModel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_training

from training import metrics
from training.report import PREDICTIONS, prediction_key


def test_evaluate_writes_scores_auroc_and_plots(tmp_path):
    trained = run_training("--artifacts", tmp_path, "--name", "tiny", "--hidden", "16", "--epochs", "3")
    assert trained.returncode == 0, trained.stderr[-2000:]
    out = tmp_path / "report"
    result = run_training("evaluate", "tiny", "--artifacts", tmp_path, "--samples", "20", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| mc |" in result.stdout
    for plot in ("reliability.png", "uncertainty.png", "training.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["test_rows"] == 180 and report["samples"] == 20
    assert set(report["scores"]) == {"deterministic (uncalibrated)", "mc (uncalibrated)", "deterministic", "mc"}
    assert report["temperature"] > 0 and report["predictive_temperature"] > 0
    for kind in ("uniform noise", "inverted"):
        for value in report["ood_auroc"][kind].values():
            assert 0.0 <= value <= 1.0
    meta = json.loads((tmp_path / "tiny" / "1" / "metadata.json").read_text())
    for kind in ("deterministic", "deterministic (uncalibrated)"):  # the same test rows, as served and raw
        key = "test_deterministic" + ("_uncalibrated" if "uncalibrated" in kind else "")
        scores = {name: value for name, value in report["scores"][kind].items() if name != "ece_floor"}
        assert scores == pytest.approx(meta["metrics"][key], abs=1e-4)
    for kind, scores in report["scores"].items():
        assert 0.0 < scores["ece_floor"] < 1.0, kind
    saved = np.load(out / PREDICTIONS)
    assert set(saved.files) == {"labels", *map(prediction_key, report["scores"])}
    for kind, scores in report["scores"].items():
        assert metrics.ece(saved[prediction_key(kind)], saved["labels"]) == pytest.approx(scores["ece"])
    assert "uncalibrated" in result.stdout
    assert set(report["mc_against"]) == set(report["scores"]) - {"mc"}
    for kind, by_score in report["mc_against"].items():
        for name, compared in by_score.items():
            assert compared["difference"] == pytest.approx(report["scores"]["mc"][name] - report["scores"][kind][name])
            assert compared["low"] <= compared["high"] and 0.0 <= compared["share_lower"] <= 1.0
    assert "| MC minus |" in result.stdout
    conformal = report["conformal"]  # the sets and abstention rules of the stored calibration, and the plain softmax's
    assert conformal["available"] and conformal["calibration"]["scores_reproduced"]
    assert conformal["calibration"]["rows"] == 468 and not conformal["calibration"]["same_samples_as_evaluation"]
    for kind in ("mc", "plain softmax"):
        sizes = [conformal["sets"][kind][alpha]["mean_size"] for alpha in ("0.05", "0.1", "0.2")]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
        for rule in conformal["abstention"][kind].values():
            assert 0.0 <= rule["accepted"] <= 1.0
            assert set(rule["ood_abstained"]) == {"uniform noise", "inverted", "boxes"}
    assert (out / "risk_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Conformal prediction sets (lac), 468 calibration rows" in result.stdout
    assert "Abstention (accept when 1 - probability + 3 * mutual information is at most" in result.stdout


def test_evaluate_refuses_unknown_models(tmp_path):
    result = run_training("evaluate", "nothing", "--artifacts", tmp_path)
    assert result.returncode == 2 and "no version" in result.stderr and "Traceback" not in result.stderr


def test_calibration_scores_on_a_hand_made_case():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([0, 1, 1, 0])
    assert metrics.accuracy(probs, labels) == 0.75
    assert metrics.nll(probs, labels) == np.mean(-np.log([0.9, 0.4, 0.8, 0.7]))
    assert np.isclose(metrics.brier(probs, labels), np.mean([0.02, 0.72, 0.08, 0.18]))
    # bins of width 0.25: {0.6, 0.7} -> confidence 0.65, accuracy 0.5; {0.9, 0.8} -> 0.85, accuracy 1.
    assert np.isclose(metrics.ece(probs, labels, bins=4), 0.5 * 0.15 + 0.5 * 0.15)
    assert metrics.ece(probs, labels, bins=2) == 0.0  # one bin: mean confidence 0.75 = accuracy


def test_paired_bootstrap_tells_a_real_difference_from_none():
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=400) > 0.8).astype(int)  # class 0 on about 80 % of the rows
    calibrated = np.tile([0.8, 0.2], (400, 1))  # right about 80 % of the time, says 0.8
    overconfident = np.tile([0.99, 0.01], (400, 1))
    better = metrics.paired_bootstrap(metrics.ece, calibrated, overconfident, labels, rounds=200)
    assert better["difference"] == metrics.ece(calibrated, labels) - metrics.ece(overconfident, labels) < -0.1
    assert better["low"] <= better["difference"] <= better["high"] < 0 and better["share_lower"] == 1.0
    assert metrics.paired_bootstrap(metrics.nll, calibrated, overconfident, labels, rounds=200)["share_lower"] == 1.0
    same = metrics.paired_bootstrap(metrics.ece, calibrated, calibrated, labels, rounds=200)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "share_lower": 0.0}


def test_ece_floor_is_the_noise_of_a_calibrated_prediction():
    certain = np.tile([1.0, 0.0], (50, 1))
    assert metrics.ece_floor(certain) == 0.0  # always right, and says so: no noise
    one_row = np.array([[0.5, 0.5]])  # right or wrong, its bin's gap is 0.5 either way
    assert metrics.ece_floor(one_row) == 0.5
    two_rows = np.array([[0.5, 0.5], [0.5, 0.5]])  # both right or both wrong (half the time): 0.5, else 0
    assert abs(metrics.ece_floor(two_rows, draws=4000) - 0.25) < 0.02
    # a calibrated prediction's ECE on its own drawn labels averages to its floor
    rng = np.random.default_rng(1)
    confident = rng.uniform(0.5, 1.0, 300)
    probs = np.stack([confident, 1 - confident], axis=-1)
    drawn = [metrics.ece(probs, (rng.uniform(size=300) >= confident).astype(int)) for _ in range(400)]
    assert abs(np.mean(drawn) - metrics.ece_floor(probs, draws=400)) < 0.003
