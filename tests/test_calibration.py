"""Temperature scaling of classifiers: fitted on validation rows by NLL, applied inside the signatures."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from training import artifact, export_model, metrics, signatures
from training.data import digits, split
from training.mc_dropout import sample
from training.uncertainty import summarize_classification


def test_fitted_temperature_undoes_hand_made_over_and_underconfidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=400)
    right = rng.uniform(size=400) < 0.7  # 70 % accuracy
    predicted = np.where(right, labels, (labels + 1) % 3)
    for top, expected in ((0.99, "above"), (0.4, "below")):  # claims 99 % (overconfident) or 40 % (under)
        probs = np.full((400, 3), (1 - top) / 2)
        probs[np.arange(400), predicted] = top
        temperature = metrics.fit_temperature(probs, labels)
        assert (temperature > 1.5) if expected == "above" else (temperature < 0.8)
        tempered = metrics.temper(probs, temperature)
        assert tempered.max(axis=-1).mean() == pytest.approx(0.7, abs=0.02)  # confidence now matches accuracy
        assert metrics.nll(tempered, labels) < metrics.nll(probs, labels)


def test_temperatures_lower_validation_nll_of_a_tiny_model(tiny_classifier):
    # The conftest classifier (3 epochs, calibrated by default): both temperatures beat T = 1 on its validation rows.
    train_rows, _ = split(digits(), 0.2, 0)
    _, validation = split(train_rows, 0.1, 0)
    model = tiny_classifier.model
    deterministic = model(validation.x, training=False).numpy()
    predictive = sample(model, validation.x, 20, 0).mean(axis=0)  # the MC predictive it was fitted on (mc_samples)
    t, t_mc = tiny_classifier.temperature, tiny_classifier.predictive_temperature
    assert t is not None and t_mc is not None and abs(np.log(t)) > 0.05
    before = metrics.nll(deterministic, validation.y)
    assert metrics.nll(metrics.temper(deterministic, t), validation.y) < before - 1e-3
    mc_before = metrics.nll(predictive, validation.y)
    assert metrics.nll(metrics.temper(predictive, t_mc), validation.y) < mc_before - 1e-3
    scores = tiny_classifier.metrics
    assert set(scores) == {"test_deterministic", "test_mc", "test_deterministic_uncalibrated", "test_mc_uncalibrated"}


def test_signatures_apply_the_stored_temperatures(tiny_classifier, digit_rows, tmp_path):
    model = tiny_classifier.model
    path = export_model(
        model, tmp_path, "calibrated", task="classification", temperature=2.5, predictive_temperature=0.5
    )
    meta = artifact.read_metadata(path)
    assert (meta.temperature, meta.predictive_temperature) == (2.5, 0.5)
    loaded = tf.saved_model.load(str(path))
    served = signatures.infer(loaded.signatures[artifact.SERVING_SIGNATURE], digit_rows)
    raw = model(digit_rows, training=False).numpy()
    np.testing.assert_allclose(served, metrics.temper(raw, 2.5), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics.temper(served, 1 / 2.5), raw, rtol=1e-3, atol=1e-6)  # the report's inverse
    alone = np.concatenate([signatures.infer(loaded.signatures["serving_default"], row[None]) for row in digit_rows])
    np.testing.assert_array_equal(alone, served)  # the same bits alone as in a batch (the tempering is row-wise)

    mc = loaded.signatures[artifact.MC_SIGNATURE]
    draws = signatures.mc_draws(mc, digit_rows, 30, 9)
    np.testing.assert_allclose(draws.outputs, sample(model, digit_rows, 30, 9), rtol=1e-4, atol=1e-6)  # raw samples
    np.testing.assert_allclose(draws.predictive, metrics.temper(draws.outputs.mean(axis=0), 0.5), rtol=1e-4, atol=1e-6)
    alone = np.concatenate([signatures.mc_draws(mc, row[None], 30, 9).predictive for row in digit_rows])
    np.testing.assert_array_equal(alone, draws.predictive)
    summary = summarize_classification(draws.outputs, draws.predictive)
    np.testing.assert_array_equal(summary.mean, draws.predictive)  # the answer's probabilities are calibrated,
    raw_summary = summarize_classification(draws.outputs)  # its uncertainty decomposition is the samples'
    np.testing.assert_array_equal(summary.mutual_information, raw_summary.mutual_information)
    np.testing.assert_array_equal(summary.label, raw_summary.label)

    plain = tf.saved_model.load(str(export_model(model, tmp_path, "plain", task="classification")))
    assert signatures.mc_draws(plain.signatures[artifact.MC_SIGNATURE], digit_rows, 5, 0).predictive is None
    with pytest.raises(ValueError, match="temperature"):
        export_model(model, tmp_path, "bad", task="classification", temperature=0.0)
