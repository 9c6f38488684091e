"""Conformal calibration of an exported model, and the answers it gives: sets, intervals, abstention.

``calibrate`` scores held-out rows through a SavedModel's own ``mc_dropout`` signature, so the
stored scores are of exactly the MC predictive a server answers with (same T, seed, temperature);
``training.export.export_model`` calls it on the staged version before publishing it, and so can
any path that exports a model with a task. The answer functions are what a server computes per
request from the stored ``artifact.ConformalCalibration`` and the request's MC summary; they
import no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training import artifact, conformal
from training.uncertainty import (
    ClassificationSummary,
    RegressionSummary,
    summarize_classification,
    summarize_regression,
)

DEFAULT_ALPHA = 0.1
DEFAULT_RISK = 0.05
DEFAULT_DELTA = 0.2
SET_SCORE = "lac"
"""The classification score new calibrations store (``conformal.SET_SCORES``); see docs/conformal.md for the choice."""
UNCERTAINTY = "1 - probability + 3 * mutual information"
"""The abstention score new calibrations store (``conformal.UNCERTAINTIES``)."""
CALIBRATION_SAMPLES = 100
"""T of the calibration predictive: the server's default (``DROPOUT_SERVE_DEFAULT_SAMPLES``)."""
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class CalibrationRows:
    """Held-out rows to calibrate an export with (``export_model(calibration=...)``), and how."""

    x: np.ndarray
    y: np.ndarray
    source: str
    """Which rows these are, for people: e.g. 'held out: 25 % of the training rows, seed 0'."""
    samples: int = CALIBRATION_SAMPLES
    seed: int = CALIBRATION_SEED
    default_risk: float = DEFAULT_RISK
    delta: float = DEFAULT_DELTA


def calibrate(
    mc_signature,
    task: artifact.Task,
    x: np.ndarray,
    y: np.ndarray,
    *,
    source: str,
    samples: int = CALIBRATION_SAMPLES,
    seed: int = CALIBRATION_SEED,
    tau: float | None = None,
    predictive_temperature: float | None = None,
    default_risk: float = DEFAULT_RISK,
    delta: float = DEFAULT_DELTA,
) -> artifact.ConformalCalibration:
    """Conformity scores of ``x``, ``y`` (rows nothing was fitted on) through ``mc_signature``.

    ``tau`` / ``predictive_temperature`` must be the ones the version is exported with: they are
    stored beside the scores so that a later change is detected (``artifact.conformal_mismatch``).
    """
    from training import signatures

    if len(y) < 1:
        raise ValueError("conformal calibration needs at least one row")
    draws = signatures.mc_draws(mc_signature, x, samples, seed)
    common = {"rows": len(y), "source": source, "samples": samples, "seed": seed}
    if task == "regression":
        summary = summarize_regression(draws.outputs, tau, draws.variance)
        scores = conformal.normalized_scores(y, summary.mean, summary.total_std)
        return artifact.ConformalCalibration(
            **common, score="normalized-residual", scores=np.sort(scores).tolist(), tau=tau
        )
    summary = summarize_classification(draws.outputs, draws.predictive)
    scores = conformal.set_scores(SET_SCORE, summary.mean, y, conformal.tie_breaks(x, seed))
    return artifact.ConformalCalibration(
        **common,
        score=SET_SCORE,
        scores=np.sort(scores).tolist(),
        predictive_temperature=predictive_temperature,
        uncertainty=UNCERTAINTY,
        uncertainties=abstention_scores(UNCERTAINTY, summary).tolist(),
        correct=(summary.label == np.asarray(y)).tolist(),
        default_risk=conformal.check_level("default risk", default_risk),
        delta=conformal.check_level("delta", delta),
    )


def prediction_sets(
    calibration: artifact.ConformalCalibration,
    summary: ClassificationSummary,
    rows: np.ndarray,
    seed: int | np.ndarray,
    alpha: float,
) -> np.ndarray:
    """``[N, K]`` membership of the level-``1 - alpha`` sets; ``rows`` and ``seed`` (or a seed per row) as sent:
    the tie-breaks of a randomized score."""
    threshold = conformal.quantile(calibration.scores, alpha)  # a sorted list: indexed, not converted
    u = conformal.tie_breaks(rows, seed) if calibration.score in conformal.RANDOMIZED else None
    return conformal.sets(calibration.score, summary.mean, threshold, u)


def intervals(
    calibration: artifact.ConformalCalibration, summary: RegressionSummary, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds ``[N, D]`` of the level-``1 - alpha`` conformal intervals."""
    q = conformal.quantile(calibration.scores, alpha)
    return conformal.interval(summary.mean, summary.total_std, q)


def abstentions(calibration: artifact.ConformalCalibration, summary: ClassificationSummary, risk: float) -> np.ndarray:
    """``[N]`` True where the rule for ``risk`` abstains (uncertainty above the calibrated threshold)."""
    threshold = abstention_threshold(calibration, risk)
    return abstention_scores(calibration.uncertainty or conformal.UNCERTAINTIES[0], summary) > threshold


def abstention_scores(name: str, summary: ClassificationSummary) -> np.ndarray:
    """The abstention score ``name`` of each instance of an MC summary (``conformal.uncertainty``)."""
    return conformal.uncertainty(name, summary.mean, summary.mutual_information)


_CACHED_RISKS = 64
"""Thresholds kept per calibration: a server sees a few risks; the bound's quantiles cost ~0.4 ms each time."""


def abstention_threshold(calibration: artifact.ConformalCalibration, risk: float) -> float:
    if calibration.uncertainties is None or calibration.correct is None or calibration.delta is None:
        raise ValueError("this calibration has no abstention scores (regression models do not abstain)")
    cached = calibration._thresholds.get(risk)
    if cached is not None:
        return cached
    threshold = conformal.abstention_threshold(
        np.asarray(calibration.uncertainties), np.asarray(calibration.correct), risk, calibration.delta
    )
    if len(calibration._thresholds) < _CACHED_RISKS:
        calibration._thresholds[risk] = threshold
    return threshold


def unavailable(meta: artifact.ModelMetadata | None) -> str | None:
    """Why a version serves no prediction sets, conformal intervals or abstention (None: it serves them)."""
    if meta is None:
        return "the SavedModel has no dropout-serve metadata, so no conformal calibration"
    if meta.conformal is None:
        return (
            "no conformal calibration stored: the version was exported without held-out calibration rows "
            "(before conformal prediction existed, or with --calibration-split 0)"
        )
    return artifact.conformal_mismatch(meta)


def samples_note(calibration: artifact.ConformalCalibration, samples: int) -> str | None:
    """What a request's T means for the guarantee, when it is not the calibration's T."""
    if samples == calibration.samples:
        return None
    return (
        f"the calibration scores were computed with T = {calibration.samples}; at T = {samples} the MC predictive "
        "differs, so coverage and risk hold only approximately"
    )
