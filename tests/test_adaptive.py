"""Adaptive T: Monte-Carlo standard errors of what decides an MC answer, and sampling until they settle."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import tensorflow as tf

from training import adaptive, artifact, signatures
from training.adaptive import Adaptive, Schedule
from training.signatures import Samples
from training.uncertainty import entropy


def test_top_probability_error_of_an_uncalibrated_classifier_is_the_standard_error_of_its_samples():
    p = np.array([[[0.9, 0.1]], [[0.7, 0.3]], [[0.8, 0.2]], [[0.6, 0.4]]])  # T = 4, one instance
    expected = np.std([0.9, 0.7, 0.8, 0.6], ddof=1) / 2
    assert adaptive.top_probability_error(p)[0] == pytest.approx(expected, rel=1e-12)
    assert adaptive.top_probability_error(p[:1])[0] == 0.0  # one sample: no estimate, nothing to go on


@pytest.mark.parametrize("temperature", [None, 0.6, 1.8])
def test_errors_predict_the_spread_of_repeated_estimates(temperature):
    """Over 2,000 repetitions of T = 100 samples from fixed Dirichlet distributions, the spread of the served top
    probability and of the mutual information matches the standard error estimated from one repetition. Where the
    top two classes nearly tie (the third distribution), the top probability's error is conservative: the largest of
    several noisy means varies less than any one of them."""
    rng = np.random.default_rng(0)
    alphas = np.array([[8.0, 1.0, 1.0], [2.0, 1.5, 0.5], [0.6, 0.5, 0.4]])
    repetitions, t = 2000, 100
    samples = np.stack([rng.dirichlet(a, size=(repetitions, t)) for a in alphas], axis=2)  # [reps, T, N, K]
    tops, informations, top_errors, information_errors = [], [], [], []
    for draws in samples:
        mean = draws.mean(axis=0)
        served = mean if temperature is None else signatures.calibrated_predictive(draws, temperature)
        tops.append(served.max(axis=-1))
        informations.append(entropy(mean) - entropy(draws).mean(axis=0))
        top_errors.append(adaptive.top_probability_error(draws, temperature))
        information_errors.append(adaptive.mutual_information_error(draws))
    np.testing.assert_allclose(np.mean(top_errors, axis=0)[:2], np.std(tops, axis=0)[:2], rtol=0.1)
    assert np.std(tops, axis=0)[2] < np.mean(top_errors, axis=0)[2] < 1.5 * np.std(tops, axis=0)[2]
    np.testing.assert_allclose(np.mean(information_errors, axis=0), np.std(informations, axis=0), rtol=0.1)
    both = adaptive.classification_error(samples[0], temperature)
    np.testing.assert_array_equal(both, np.maximum(top_errors[0], information_errors[0]))


def test_regression_error_is_relative_to_the_total_std():
    means = np.array([[[1.0, 0.0]], [[3.0, 0.0]]])  # T = 2, one instance, two outputs (the second never moves)
    # epistemic variance 1 (population), standard error sqrt(2) / sqrt(2) = 1, total std sqrt(1 + 1/tau) = sqrt(5)
    assert adaptive.regression_error(means, tau=0.25)[0] == pytest.approx(1 / np.sqrt(5))
    variance = np.full_like(means, 3.0)  # heteroscedastic: total std sqrt(1 + 3)
    assert adaptive.regression_error(means, None, variance)[0] == pytest.approx(0.5)
    assert adaptive.regression_error(np.zeros((5, 1, 1)), None)[0] == 0.0  # no spread, no noise: settled


def test_schedule_jumps_to_what_the_error_predicts():
    schedule = Schedule(first=10, step=10)
    assert schedule.start(1000) == 10 and schedule.start(4) == 4
    assert schedule.target(10, 0.01, 0.01, 1000) == 10  # settled
    assert schedule.target(10, 0.011, 0.01, 1000) == 20  # needs 12.1: one more step
    assert schedule.target(10, 0.05, 0.01, 1000) == 250  # needs 250: all at once
    assert schedule.target(10, 0.0501, 0.01, 1000) == 260  # needs 251.001, rounded up to a step
    assert schedule.target(40, 0.012, 0.01, 1000) == 60  # needs 57.6, rounded up to a step
    assert schedule.target(100, 0.05, 0.01, 1000) == 1000  # needs 2,500: never beyond the maximum
    assert schedule.target(1000, 0.05, 0.01, 1000) == 1000  # at the maximum: stop


def test_adaptive_sampling_stops_early_when_confident_longer_out_of_distribution_and_replays(
    confident_classifier, confident_classifier_dir
):
    from training.data import digits

    loaded = tf.saved_model.load(str(confident_classifier_dir))
    temperature = confident_classifier.predictive_temperature
    error = adaptive.error_function("classification", None, temperature)
    x = digits().x[:200].astype(np.float32)
    start = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], x, 50, 0)
    confident = x[np.argmin(error(start))]  # the digit the model is surest of (another seed than below)
    noise = np.random.default_rng(3).uniform(0, 16, size=(2, 64)).astype(np.float32)
    inputs = np.stack([confident, *noise, 16 - confident])  # a clear digit, two noise images, an inverted digit
    call = partial(signatures.segment_draws, loaded.signatures[artifact.MC_SEGMENTS_SIGNATURE])

    def run(seed: int) -> dict[int, Samples]:
        finished = Adaptive(inputs, seed, error, adaptive.DEFAULT_TOLERANCE, maximum=400).run(call)
        return {int(r): Samples(draws.outputs[:, [i]], None) for rows, draws in finished for i, r in enumerate(rows)}

    first, again = run(7), run(7)
    assert sorted(first) == [0, 1, 2, 3]
    used = {row: draws.outputs.shape[0] for row, draws in first.items()}
    assert all(10 <= t <= 400 for t in used.values())
    assert used[0] <= 50 and min(used[1], used[2], used[3]) >= 4 * used[0], used
    mc = loaded.signatures[artifact.MC_SIGNATURE]
    for row, draws in first.items():
        assert draws.outputs.tobytes() == again[row].outputs.tobytes()  # the same seed, the same answer
        alone = signatures.mc_draws(mc, inputs[row : row + 1], used[row], 7).outputs
        np.testing.assert_array_equal(draws.outputs, alone)  # = samples: T with that seed, T the one it used
        assert error(draws)[0] <= adaptive.DEFAULT_TOLERANCE or used[row] == 400


def test_a_request_takes_as_many_stretches_as_its_slowest_instance_alone(
    confident_classifier, confident_classifier_dir
):
    """bench/adaptive.py's stretch count: decisions are per instance, so a request of several instances runs as
    many stretches as the one that takes most of them alone, and never fewer than one."""
    from bench.adaptive import rounds
    from training.data import digits

    loaded = tf.saved_model.load(str(confident_classifier_dir))
    noise = np.random.default_rng(4).uniform(0, 16, size=(3, 64)).astype(np.float32)
    inputs = np.concatenate([digits().x[:5].astype(np.float32), noise])
    call = partial(signatures.segment_draws, loaded.signatures[artifact.MC_SEGMENTS_SIGNATURE])
    count = partial(rounds, call, inputs, 7, temperature=confident_classifier.predictive_temperature, maximum=400)
    alone = count(per_request=1)
    assert alone.shape == (8,) and alone.min() >= 1 and alone.max() > alone.min()  # confident digits and noise differ
    assert count(per_request=8).tolist() == [alone.max()]
    assert count(per_request=3).tolist() == [alone[0:3].max(), alone[3:6].max(), alone[6:8].max()]
