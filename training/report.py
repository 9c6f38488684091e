"""How trustworthy a classifier's uncertainty is, measured through its exported SavedModel.

``python -m training evaluate digits`` scores inference-mode ("deterministic") and MC-dropout
predictions on the held-out test rows (accuracy, NLL, Brier, ECE), checks how well MC mutual
information and predictive entropy tell test digits from out-of-distribution inputs (AUROC),
and draws a reliability diagram, uncertainty histograms and the training curves.

A calibrated model (temperatures in its metadata) is scored as served and before calibration:
the raw inference-mode probabilities are recovered from the served ones as
``softmax(temperature * log q)`` (exact up to float32 rounding of tiny probabilities, which are
clipped at 1e-30 anyway); the raw MC predictive is the mean of ``mc_dropout``'s raw samples.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from training import artifact, conformal_report, metrics, signatures
from training.data import DIGITS, Dataset, digits, load
from training.train import Rows, split_rows
from training.uncertainty import entropy, summarize_classification


def held_out_rows(meta: artifact.ModelMetadata, **changed: float) -> Rows:
    """The rows the model was trained, calibrated and scored on, re-split with its training settings
    (``changed``: some of them otherwise, e.g. ``calibration_from_test=0.0`` for the test rows whole)."""
    source = meta.training.get("data", DIGITS)
    if source == DIGITS:
        data = digits(images=len(meta.input_shape) > 1)
    else:
        data = load(source, meta.training.get("target"), meta.task)
    return split_rows(data, {**meta.training.get("fit", {}), **changed})


def out_of_distribution(train: Dataset, like: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Inputs the model never saw: uniform noise over the feature range, and inverted intensities."""
    low, high = float(train.x.min()), float(train.x.max())
    rng = np.random.default_rng(seed)
    return {
        "uniform noise": rng.uniform(low, high, size=like.shape).astype(np.float32),
        "inverted": (low + high - like).astype(np.float32),
    }


PREDICTIONS = "predictions.npz"
"""Test labels and each kind of prediction's probabilities, keyed by ``prediction_key(kind)``."""

COMPARED = ("nll", "ece")
"""Scores the MC predictive is compared on, against each other prediction of the same test rows."""


def evaluate(version_dir: Path, out: Path, samples: int = 100, seed: int = 0) -> dict:
    meta = artifact.read_metadata(version_dir)
    if meta is None or meta.task != "classification":
        raise ValueError(f"{version_dir}: evaluate needs a classification model exported by dropout-serve")
    loaded = tf.saved_model.load(str(version_dir))
    if artifact.MC_SIGNATURE not in loaded.signatures:
        raise ValueError(f"{version_dir}: the model has no {artifact.MC_SIGNATURE} signature")

    def deterministic(x: np.ndarray) -> np.ndarray:
        return signatures.infer(loaded.signatures[artifact.SERVING_SIGNATURE], x)

    def mc(x: np.ndarray) -> signatures.Samples:
        return signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], x, samples, seed)

    rows = held_out_rows(meta)
    train, test = rows.train, rows.test
    det_probs = deterministic(test.x)
    mc_draws = mc(test.x)
    mc_summary = summarize_classification(mc_draws.outputs, mc_draws.predictive)
    calibrated = meta.temperature is not None or meta.predictive_temperature is not None
    predictions = {}
    if calibrated:
        predictions["deterministic (uncalibrated)"] = metrics.temper(det_probs, 1.0 / meta.temperature)
        predictions["mc (uncalibrated)"] = mc_draws.outputs.mean(axis=0)
    predictions["deterministic"] = det_probs
    predictions["mc"] = mc_summary.mean
    scores = {
        kind: {**metrics.classification_scores(p, test.y), "ece_floor": metrics.ece_floor(p, seed=seed)}
        for kind, p in predictions.items()
    }

    inputs = {"in-distribution": test.x, **out_of_distribution(train, test.x, seed)}
    uncertainty, uncalibrated = {}, {}
    for name, x in inputs.items():
        det, draws = (det_probs, mc_draws) if name == "in-distribution" else (deterministic(x), mc(x))
        uncertainty[name] = _uncertainties(det, summarize_classification(draws.outputs, draws.predictive))
        if calibrated:  # the MC measures are of the raw samples either way; the deterministic entropy changes
            raw_det = metrics.temper(det, 1.0 / meta.temperature)
            uncalibrated[name] = _uncertainties(raw_det, summarize_classification(draws.outputs))
    auroc = _aurocs(uncertainty)

    def plain(x: np.ndarray) -> np.ndarray:  # the Keras model's own softmax, before temperature calibration
        return deterministic(x) if meta.temperature is None else metrics.temper(deterministic(x), 1 / meta.temperature)

    def mc_at(x: np.ndarray, t: int, s: int) -> signatures.Samples:
        return signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], x, t, s)

    conformal, conformal_arrays = conformal_report.evaluate(
        meta, rows.calibration, test, plain, mc_at, out_of_distribution(train, test.x, seed), samples, seed
    )

    out.mkdir(parents=True, exist_ok=True)
    _plot_reliability(det_probs, mc_summary.mean, test.y, out / "reliability.png")
    _plot_uncertainty(uncertainty, out / "uncertainty.png")
    if meta.history:
        _plot_history(meta.history, out / "training.png")
    if conformal_arrays:
        conformal_report.plot_risk_coverage(conformal_arrays, conformal, out / "risk_coverage.png")
        np.savez_compressed(out / conformal_report.ARRAYS, **conformal_arrays)
    report = {
        "model": meta.name,
        "version": meta.version,
        "test_rows": len(test.y),
        "samples": samples,
        "seed": seed,
        "temperature": meta.temperature,
        "predictive_temperature": meta.predictive_temperature,
        "scores": scores,
        "mc_against": _mc_against(predictions, test.y, seed),
        "ood_auroc": auroc,
        "conformal": conformal,
    }
    if calibrated:
        report["ood_auroc_uncalibrated"] = _aurocs(uncalibrated)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    np.savez_compressed(
        out / PREDICTIONS, labels=test.y, **{prediction_key(kind): p for kind, p in predictions.items()}
    )
    (out / "report.md").write_text(markdown(report))
    return report


def prediction_key(kind: str) -> str:
    """``deterministic (uncalibrated)`` -> ``deterministic_uncalibrated``: a name .npz files accept."""
    return kind.replace(" (", "_").rstrip(")")


def load_predictions(report_dirs: Iterable[Path]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Several reports' test labels and predictions (``PREDICTIONS``), concatenated: one larger test set."""
    files = [np.load(folder / PREDICTIONS) for folder in report_dirs]
    labels = np.concatenate([f["labels"] for f in files])
    return labels, {key: np.concatenate([f[key] for f in files]) for key in files[0].files if key != "labels"}


def _mc_against(predictions: dict[str, np.ndarray], labels: np.ndarray, seed: int) -> dict[str, dict]:
    """The served MC predictive's NLL and ECE minus each other prediction's, with paired-bootstrap intervals."""
    mc = predictions["mc"]
    return {
        kind: {
            name: metrics.paired_bootstrap(getattr(metrics, name), mc, other, labels, seed=seed) for name in COMPARED
        }
        for kind, other in predictions.items()
        if kind != "mc"
    }


def _uncertainties(det_probs: np.ndarray, summary) -> dict[str, np.ndarray]:
    return {
        "mc mutual information": summary.mutual_information,
        "mc predictive entropy": summary.predictive_entropy,
        "deterministic entropy": entropy(det_probs.astype(np.float64)),
    }


def _aurocs(uncertainty: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    inside = uncertainty["in-distribution"]
    return {
        name: {measure: ood_auroc(inside[measure], values[measure]) for measure in inside}
        for name, values in uncertainty.items()
        if name != "in-distribution"
    }


def ood_auroc(in_distribution: np.ndarray, outside: np.ndarray) -> float:
    """Chance that an out-of-distribution input gets more uncertainty than a test input."""
    labels = np.r_[np.zeros(len(in_distribution)), np.ones(len(outside))]
    return float(roc_auc_score(labels, np.r_[in_distribution, outside]))


def markdown(report: dict) -> str:
    lines = [
        f"# {report['model']} version {report['version']}: deterministic vs MC dropout",
        "",
        f"{report['test_rows']} held-out test rows, T = {report['samples']} MC samples, seed {report['seed']}.",
        "",
        f"Temperatures fitted on the validation rows by NLL and applied inside the signatures: "
        f"{report['temperature']:.3f} (deterministic), {report['predictive_temperature']:.3f} (MC predictive). "
        "The rows marked uncalibrated are the same predictions before calibration."
        if report.get("temperature") is not None
        else "Not calibrated (trained with --no-calibrate).",
        "",
        "| predictions | accuracy | NLL | Brier | ECE | ECE floor |",
        "|---|---|---|---|---|---|",
    ]
    for kind, s in report["scores"].items():
        lines.append(
            f"| {kind} | {s['accuracy']:.4f} | {s['nll']:.4f} | {s['brier']:.4f} | {s['ece']:.4f} "
            f"| {s['ece_floor']:.4f} |"
        )
    lines += [
        "",
        _FLOOR_NOTE,
        "",
        _COMPARISON_NOTE,
        "",
        "| MC minus | " + " | ".join(f"{name.upper()} | 90 % interval | MC lower in" for name in COMPARED) + " |",
        "|---" * (1 + 3 * len(COMPARED)) + "|",
    ]
    for kind, by_score in report["mc_against"].items():
        cells = [
            f"{c['difference']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | {c['share_lower']:.0%}"
            for c in (by_score[name] for name in COMPARED)
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    measures = list(next(iter(report["ood_auroc"].values())))
    lines += ["", "Out-of-distribution detection, AUROC (test digits vs each set):", ""]
    lines += ["| inputs | " + " | ".join(measures) + " |", "|---" * (len(measures) + 1) + "|"]
    for name, values in report["ood_auroc"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.3f}" for m in measures) + " |")
    for name, values in report.get("ood_auroc_uncalibrated", {}).items():
        lines.append(f"| {name}, uncalibrated | " + " | ".join(f"{values[m]:.3f}" for m in measures) + " |")
    lines += conformal_report.markdown(report["conformal"])
    return "\n".join(lines) + "\n"


_FLOOR_NOTE = (
    "ECE floor: the ECE a perfectly calibrated prediction with the same confidences would show on this "
    "many rows (binned ECE is biased upward on few rows, most for predictions with many rows at middling "
    "confidence). ECE near its floor is noise; predictions with different floors are not ranked by ECE."
)

_COMPARISON_NOTE = (
    "MC dropout as served against the other predictions of the same test rows: the score's difference "
    "(negative: MC is lower, better), its 90 % paired-bootstrap interval and the share of 1,000 resamples "
    "of the test rows in which MC scores lower. An interval across zero is a difference the test set "
    "cannot tell from noise. ECE's interval inherits ECE's bias: between predictions with different "
    "floors it leans toward the one with the lower floor."
)


def _plot_reliability(det: np.ndarray, mc: np.ndarray, labels: np.ndarray, path: Path, bins: int = 15) -> None:
    """Accuracy against confidence per bin (the gap to the diagonal is miscalibration), with bin sizes."""
    figure = Figure(figsize=(10, 6))
    axes = figure.subplots(2, 2, sharex=True, height_ratios=[3, 1])
    left = np.linspace(0, 1, bins + 1)[:-1]
    for column, (title, probs) in enumerate([("deterministic", det), ("MC dropout", mc)]):
        count, confidence, accuracy = metrics.calibration_bins(probs, labels, bins)
        filled = count > 0
        top, bottom = axes[0, column], axes[1, column]
        top.bar(left[filled], accuracy[filled], width=1 / bins, align="edge", edgecolor="black", label="accuracy")
        top.bar(
            left[filled],
            np.abs(confidence - accuracy)[filled],
            bottom=np.minimum(confidence, accuracy)[filled],
            width=1 / bins,
            align="edge",
            color="tab:red",
            alpha=0.35,
            hatch="//",
            label="gap to mean confidence",
        )
        top.plot([0, 1], [0, 1], "k--", linewidth=1)
        top.set(title=f"{title}: ECE {metrics.ece(probs, labels, bins):.4f}", ylabel="accuracy", ylim=(0, 1))
        top.legend(loc="upper left")
        bottom.bar(left, count, width=1 / bins, align="edge", color="gray", edgecolor="black")
        bottom.set(xlabel="confidence (top-class probability)", ylabel="test rows", yscale="log", xlim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _plot_uncertainty(uncertainty: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    measures = list(uncertainty["in-distribution"])
    figure = Figure(figsize=(5 * len(measures), 4))
    axes = figure.subplots(1, len(measures))
    for ax, measure in zip(axes, measures, strict=True):
        top = max(values[measure].max() for values in uncertainty.values()) or 1.0
        for name, values in uncertainty.items():
            ax.hist(values[measure], bins=40, range=(0, top), histtype="step", linewidth=1.5, label=name)
        ax.set(title=measure, xlabel="nats", ylabel="inputs", yscale="log")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _plot_history(history: dict[str, list[float]], path: Path) -> None:
    kinds = [k for k in history if not k.startswith("val_")]
    figure = Figure(figsize=(5 * len(kinds), 4))
    axes = figure.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        epochs = np.arange(1, len(history[kind]) + 1)
        ax.plot(epochs, history[kind], label="training (dropout on)")
        if f"val_{kind}" in history:
            ax.plot(epochs, history[f"val_{kind}"], label="validation (inference mode)")
        ax.set(title=kind, xlabel="epoch")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
