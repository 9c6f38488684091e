"""Conformal calibration stored at export: computed through the version's own mc_dropout, rebuilt or refused
when the predictive it was computed from changes, and covering fresh rows at the level."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import get_args

import numpy as np
import pytest
import tensorflow as tf

from training import artifact, conformal, conformity, export_model, signatures
from training.uncertainty import ClassificationSummary, summarize_classification


@pytest.fixture(scope="module")
def calibrated(calibrated_classifier_dir):
    """The tiny classifier exported with its held-out calibration rows (and temperatures)."""
    return calibrated_classifier_dir, artifact.read_metadata(calibrated_classifier_dir)


def test_calibration_rows_are_held_out_from_fitting_validation_and_test(tiny_classifier):
    from training.data import digits
    from training.train import TrainConfig, split_rows

    data = digits()
    numbered = replace(data, x=np.arange(len(data.y), dtype=np.float32)[:, None])  # each row its own index
    rows = split_rows(numbered, TrainConfig().__dict__)
    whole = split_rows(numbered, {**TrainConfig().__dict__, "calibration_from_test": 0.0})
    ids = {part: set(getattr(rows, part).x[:, 0].astype(int)) for part in ("fit", "validation", "calibration", "test")}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values())) == len(data.y)  # a partition
    assert (len(ids["test"]), len(ids["calibration"]), len(ids["fit"])) == (180, 288 + 180, 1005)
    # the fitting and validation rows are those without the test share: the model does not change
    assert ids["fit"] == set(whole.fit.x[:, 0].astype(int)) and ids["validation"] == set(whole.validation.x[:, 0])
    assert ids["calibration"] - set(whole.calibration.x[:, 0]) == set(whole.test.x[:, 0]) - ids["test"]
    order = rows.calibration.x[:, 0].astype(int)  # the tiny model was calibrated on exactly these rows
    np.testing.assert_array_equal(tiny_classifier.calibration.x, data.x[order])
    np.testing.assert_array_equal(tiny_classifier.calibration.y, data.y[order])
    np.testing.assert_array_equal(tiny_classifier.test.x, data.x[rows.test.x[:, 0].astype(int)])


def test_taking_calibration_rows_from_the_test_share_leaves_the_model_bit_for_bit_the_same():
    from training.data import digits
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    models = [
        train(digits(), ModelConfig(hidden=(16,)), TrainConfig(epochs=2, mc_samples=5, calibration_from_test=share))
        for share in (0.0, 0.5)
    ]
    assert [len(m.calibration.y) for m in models] == [288, 468] and [len(m.test.y) for m in models] == [360, 180]
    for before, after in zip(models[0].model.get_weights(), models[1].model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert models[0].temperature == models[1].temperature  # the same validation rows


def test_stored_scores_are_those_of_the_served_mc_predictive(calibrated, tiny_classifier):
    path, meta = calibrated
    stored = meta.conformal
    assert (stored.rows, stored.samples, stored.seed) == (468, 30, 5)
    assert (stored.score, stored.uncertainty) == (conformity.SET_SCORE, conformity.UNCERTAINTY)
    assert stored.predictive_temperature == meta.predictive_temperature is not None
    rows = tiny_classifier.calibration
    draws = signatures.mc_draws(tf.saved_model.load(str(path)).signatures["mc_dropout"], rows.x, 30, 5)
    summary = summarize_classification(draws.outputs, draws.predictive)
    served = summary.mean
    expected = conformal.set_scores(stored.score, served, rows.y, conformal.tie_breaks(rows.x, 5))
    np.testing.assert_array_equal(stored.scores, np.sort(expected))
    np.testing.assert_array_equal(stored.correct, served.argmax(-1) == rows.y)
    uncertainty = conformal.uncertainty(stored.uncertainty, served, summary.mutual_information)
    np.testing.assert_allclose(stored.uncertainties, uncertainty)
    assert stored.default_risk == conformity.DEFAULT_RISK and stored.delta == conformity.DEFAULT_DELTA


def test_another_temperature_or_t_rebuilds_the_scores_and_a_changed_model_is_refused(calibrated, tiny_classifier):
    path, meta = calibrated
    rows = tiny_classifier.calibration
    hotter = export_model(
        tiny_classifier.model,
        path.parent.parent,
        "tiny",
        task="classification",
        predictive_temperature=2 * tiny_classifier.predictive_temperature,
        calibration=conformity.CalibrationRows(rows.x, rows.y, source="test rows", samples=10, seed=5),
    )
    rebuilt = artifact.read_metadata(hotter).conformal
    assert (rebuilt.samples, rebuilt.predictive_temperature) == (10, 2 * tiny_classifier.predictive_temperature)
    assert rebuilt.scores != meta.conformal.scores
    assert artifact.conformal_mismatch(meta) is None
    edited = meta.model_copy(update={"predictive_temperature": 1.5})  # someone recalibrated the signature's temperature
    assert "predictive_temperature" in artifact.conformal_mismatch(edited) and "rebuild" in artifact.conformal_mismatch(
        edited
    )


def test_sets_cover_fresh_rows_and_grow_as_alpha_shrinks(calibrated, tiny_classifier):
    path, meta = calibrated
    test = tiny_classifier.test
    loaded = tf.saved_model.load(str(path))
    coverage, sizes = {}, {}
    for alpha in (0.3, 0.1, 0.05):
        covered, size = [], []
        for seed in range(3):  # three requests, each its own MC masks and tie-breaks
            draws = signatures.mc_draws(loaded.signatures["mc_dropout"], test.x, 30, seed)
            summary = summarize_classification(draws.outputs, draws.predictive)
            sets = conformity.prediction_sets(meta.conformal, summary, test.x, seed, alpha)
            covered.append(sets[np.arange(len(test.y)), test.y])
            size.append(sets.sum(axis=1))
        coverage[alpha], sizes[alpha] = np.mean(covered), np.mean(size)
        # 180 rows x 3 seeds; the seeds share rows, so allow the one-seed binomial error (4 s.e.) plus the
        # calibration set's own spread (about sqrt(alpha (1 - alpha) / 468))
        band = 4 * math.sqrt(alpha * (1 - alpha) / 180) + 2 * math.sqrt(alpha * (1 - alpha) / 468)
        assert abs(coverage[alpha] - (1 - alpha)) < band, (alpha, coverage[alpha])
    assert sizes[0.3] < sizes[0.1] < sizes[0.05]


def test_a_calibration_stored_before_lac_still_answers_with_its_own_aps_score(calibrated, tiny_classifier):
    """Versions exported with randomized APS and ``1 - probability`` keep their sets and abstention rule."""
    meta, test = calibrated[1], tiny_classifier.test
    old, summary = _stored_before(
        calibrated,
        tiny_classifier,
        lambda cal, rows: {
            "score": "aps-randomized",
            "scores": np.sort(conformal.aps_scores(cal.mean, rows.y, conformal.tie_breaks(rows.x, 5))).tolist(),
            "uncertainty": "1 - probability",
            "uncertainties": (1 - cal.mean.max(-1)).tolist(),
        },
    )
    sets = conformity.prediction_sets(old, summary, test.x, 1, 0.1)
    threshold = conformal.quantile(np.asarray(old.scores), 0.1)
    np.testing.assert_array_equal(sets, conformal.aps_sets(summary.mean, threshold, conformal.tie_breaks(test.x, 1)))
    assert not np.array_equal(sets, conformity.prediction_sets(meta.conformal, summary, test.x, 1, 0.1))
    abstain = conformity.abstentions(old, summary, 0.5)
    expected = 1 - summary.mean.max(-1) > conformal.abstention_threshold(
        np.asarray(old.uncertainties), np.asarray(old.correct), 0.5, old.delta
    )
    np.testing.assert_array_equal(abstain, expected)
    assert 0 < abstain.mean() < 1


def test_a_calibration_stored_with_unit_weight_still_abstains_by_its_own_rule(calibrated, tiny_classifier):
    """Versions exported before the mutual information's weight became 3 keep ``1 - p + MI``."""
    meta = calibrated[1]
    old, summary = _stored_before(
        calibrated,
        tiny_classifier,
        lambda cal, _rows: {
            "uncertainty": "1 - probability + mutual information",
            "uncertainties": (1 - cal.mean.max(-1) + cal.mutual_information).tolist(),
        },
    )
    threshold = conformal.abstention_threshold(np.asarray(old.uncertainties), np.asarray(old.correct), 0.5, old.delta)
    unit = 1 - summary.mean.max(-1) + summary.mutual_information
    np.testing.assert_array_equal(conformity.abstentions(old, summary, 0.5), unit > threshold)
    tripled = 1 - summary.mean.max(-1) + 3 * summary.mutual_information
    assert meta.conformal.uncertainty == "1 - probability + 3 * mutual information"
    assert not np.array_equal(unit > threshold, tripled > threshold)  # the weight changes which rows pass


def _stored_before(
    calibrated, tiny_classifier, stored: Callable[..., dict]
) -> tuple[artifact.ConformalCalibration, ClassificationSummary]:
    """The version's calibration as an earlier export stored it (``stored(summary, rows)`` of its calibration rows,
    MC seed 5: the fields that differ), read back from metadata; and the summary of the test rows at seed 1."""
    path, meta = calibrated
    rows = tiny_classifier.calibration
    mc = tf.saved_model.load(str(path)).signatures["mc_dropout"]
    cal = summarize_classification(*_draws(mc, rows.x, 5))
    old = meta.conformal.model_copy(update=stored(cal, rows))
    old = artifact.ConformalCalibration.model_validate(old.model_dump())  # as read back from its metadata
    return old, summarize_classification(*_draws(mc, tiny_classifier.test.x, 1))


def _draws(mc, x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    draws = signatures.mc_draws(mc, x, 30, seed)
    return draws.outputs, draws.predictive


def test_export_without_dropout_cannot_be_calibrated(tmp_path):
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    rows = conformity.CalibrationRows(np.zeros((5, 3), np.float32), np.zeros((5, 1), np.float32), source="zeros")
    with pytest.raises(ValueError, match="needs MC dropout"):
        export_model(model, tmp_path, "plain", task="regression", calibration=rows)
    assert artifact.versions(tmp_path / "plain") == []


def test_the_artifact_contract_names_exactly_the_scores_the_code_computes():
    """The stored score names are listed in the contract (``artifact.ConformalCalibration``) and in
    ``training.conformal``: a name in one and not the other would fail only when such an artifact is exported
    or served."""
    fields = artifact.ConformalCalibration.model_fields
    (stored_uncertainties, _none) = get_args(fields["uncertainty"].annotation)
    assert set(get_args(stored_uncertainties)) == set(conformal.UNCERTAINTIES)
    assert conformity.UNCERTAINTY in conformal.UNCERTAINTIES
    assert set(get_args(fields["score"].annotation)) == {*conformal.SET_SCORES, "normalized-residual"}
