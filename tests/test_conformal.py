"""The conformal math on synthetic exchangeable data: finite-sample coverage, monotone levels, the risk bound."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from training import conformal

REPEATS = 200


def _binomial_band(level: float, rows: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(level * (1 - level) / rows)


def test_quantile_is_the_finite_sample_corrected_order_statistic():
    scores = np.arange(1.0, 10.0)  # n = 9
    assert conformal.quantile(scores, 0.1) == 9.0  # ceil(10 * 0.9) = 9th smallest
    assert conformal.quantile(scores, 0.5) == 5.0  # ceil(10 * 0.5) = 5
    assert conformal.quantile(scores[:8], 0.1) == math.inf  # ceil(9 * 0.9) = 9 > 8 rows: no finite answer
    assert conformal.quantile(np.arange(1.0, 100.0), 0.1) == 90.0  # (n + 1)(1 - alpha) = 90 exactly, not 91


def _classification(rng: np.random.Generator, rows: int, classes: int = 5, truthful: bool = False):
    """Rows whose label is drawn from a Dirichlet probability vector; the 'model' is a distorted version of it
    (overconfident: coverage must not care), or the vector itself when ``truthful``."""
    truth = rng.dirichlet(np.full(classes, 0.4), size=rows)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    return (truth if truthful else truth**2 / (truth**2).sum(axis=1, keepdims=True)), labels


def _coverage_and_size(rng: np.random.Generator, score: str, alpha: float, truthful: bool = False):
    """Mean coverage and set size of ``score``'s sets over ``REPEATS`` fresh calibration and test draws."""
    n_cal, n_test = 300, 200
    coverage, sizes = [], []
    for _ in range(REPEATS):
        probs, labels = _classification(rng, n_cal + n_test, truthful=truthful)
        u = rng.uniform(size=len(labels))
        scores = np.sort(conformal.set_scores(score, probs[:n_cal], labels[:n_cal], u[:n_cal]))
        sets = conformal.sets(score, probs[n_cal:], conformal.quantile(scores, alpha), u[n_cal:])
        coverage.append(sets[np.arange(n_test), labels[n_cal:]].mean())
        sizes.append(sets.sum(axis=1).mean())
    return float(np.mean(coverage)), float(np.mean(sizes))


@pytest.mark.parametrize("score", sorted(conformal.SET_SCORES))
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_sets_cover_at_the_level_on_exchangeable_rows(score, alpha):
    mean, size = _coverage_and_size(np.random.default_rng(0), score, alpha)
    band = _binomial_band(1 - alpha, REPEATS * 200) + 0.01  # + 0.01: rows share a calibration set
    assert 1 - alpha - band <= mean <= 1 - alpha + 1 / 301 + band
    assert 1.0 < size < 5.0  # neither one class nor everything


def test_lac_sets_are_smaller_than_aps_sets_when_the_probabilities_are_true():
    """LAC's sets have the least expected size at their coverage when the model's probabilities are the
    true ones (Sadinle, Lei & Wasserman 2019): why a calibrated predictive gets small LAC sets."""
    rng = np.random.default_rng(6)
    lac, aps = (_coverage_and_size(rng, score, 0.1, truthful=True) for score in ("lac", "aps-randomized"))
    assert abs(lac[0] - aps[0]) < 0.01  # the same coverage, within the repeats' error
    assert lac[1] < aps[1] - 0.05, (lac, aps)  # 2.28 against 2.41 labels; the mean over 40,000 rows is sharp


@pytest.mark.parametrize("score", sorted(conformal.SET_SCORES))
def test_sets_hold_exactly_the_classes_whose_score_is_below_the_threshold(score):
    rng = np.random.default_rng(1)
    probs, _ = _classification(rng, 50)
    u = rng.uniform(size=50)
    sets = conformal.sets(score, probs, 0.7, u)
    for k in range(probs.shape[1]):
        np.testing.assert_array_equal(sets[:, k], conformal.set_scores(score, probs, np.full(50, k), u) <= 0.7)


def test_sets_and_intervals_grow_as_alpha_shrinks():
    rng = np.random.default_rng(2)
    probs, labels = _classification(rng, 400)
    u = rng.uniform(size=400)
    scores = np.sort(conformal.aps_scores(probs[:300], labels[:300], u[:300]))
    alphas = [0.5, 0.3, 0.2, 0.1, 0.05, 0.01]
    sets = [conformal.aps_sets(probs[300:], conformal.quantile(scores, a), u[300:]) for a in alphas]
    for looser, stricter in itertools.pairwise(sets):
        assert np.all(stricter >= looser)  # nested
    assert sets[-1].sum() > sets[0].sum()
    mean, scale = rng.normal(size=(100, 1)), rng.uniform(0.5, 2.0, size=(100, 1))
    bounds = [conformal.interval(mean, scale, conformal.quantile(scores, a)) for a in alphas]
    widths = [float(np.mean(upper - lower)) for lower, upper in bounds]
    assert widths == sorted(widths) and widths[-1] > widths[0]


def test_normalized_intervals_cover_heteroscedastic_noise_with_a_wrong_scale():
    rng = np.random.default_rng(3)
    n_cal, n_test, coverage, widths = 250, 200, [], []
    for _ in range(REPEATS):
        x = rng.uniform(0, 3, size=n_cal + n_test)
        y = np.sin(x) + rng.normal(size=x.shape) * (0.1 + x)  # noise grows with x
        mean, scale = np.sin(x)[:, None], (0.5 + 0.5 * x)[:, None]  # the model's sigma is off by a factor
        scores = np.sort(conformal.normalized_scores(y[:n_cal, None], mean[:n_cal], scale[:n_cal]))
        lower, upper = conformal.interval(mean[n_cal:], scale[n_cal:], conformal.quantile(scores, 0.1))
        coverage.append(np.mean((lower[:, 0] <= y[n_cal:]) & (y[n_cal:] <= upper[:, 0])))
        widths.append(np.mean(upper - lower))
    band = _binomial_band(0.9, REPEATS * n_test) + 0.01
    assert 0.9 - band <= np.mean(coverage) <= 0.9 + 1 / (n_cal + 1) + band


def test_tie_breaks_are_deterministic_uniform_and_seeded():
    rows = np.random.default_rng(4).normal(size=(4000, 8)).astype(np.float32)
    u = conformal.tie_breaks(rows, 7)
    np.testing.assert_array_equal(u, conformal.tie_breaks(rows, 7))
    np.testing.assert_array_equal(u[10:20], conformal.tie_breaks(rows[10:20], 7))  # independent of the batch
    assert np.all((u >= 0) & (u < 1)) and abs(u.mean() - 0.5) < 0.02 and abs(np.mean(u < 0.1) - 0.1) < 0.02
    assert not np.array_equal(u, conformal.tie_breaks(rows, 8))


@pytest.mark.parametrize(("errors", "rows"), [(0, 50), (3, 200), (20, 100), (100, 100)])
def test_clopper_pearson_upper_is_the_exact_binomial_bound(errors, rows):
    high = binomtest(errors, rows).proportion_ci(confidence_level=0.8, method="exact").high  # two-sided 80 % = 90 % up
    assert conformal.clopper_pearson_upper(np.array([errors]), np.array([rows]), 0.1)[0] == pytest.approx(high)


def test_abstention_keeps_the_error_among_accepted_rows_below_the_risk_with_high_probability():
    # Error probability 0.2 u for uncertainty u ~ U(0, 1): accepting u <= t has selective risk 0.1 t.
    rng = np.random.default_rng(5)
    risk, delta, violations, accepted = 0.05, 0.1, 0, []
    for _ in range(REPEATS):
        uncertainty = rng.uniform(size=1000)
        correct = rng.uniform(size=1000) >= 0.2 * uncertainty
        threshold = conformal.abstention_threshold(uncertainty, correct, risk, delta)
        violations += 0.1 * min(threshold, 1.0) > risk
        accepted.append(min(max(threshold, 0.0), 1.0))
    assert violations / REPEATS <= delta  # the guarantee: at most delta of calibration sets overshoot
    # Not vacuous, though conservative: t = 0.5 is where the risk reaches 0.05, and the fixed sequence stops at
    # its first failing threshold, often a chance error among the first few dozen accepted rows.
    assert 0.1 < np.mean(accepted) <= 0.5 and np.mean(np.array(accepted) > 0.3) > 0.2


def test_abstention_abstains_on_everything_when_the_rows_cannot_support_the_risk():
    uncertainty, correct = np.linspace(0, 1, 100), np.ones(100, dtype=bool)
    assert conformal.abstention_threshold(uncertainty, correct, 0.01, 0.1) == -math.inf  # 230 rows needed
    assert conformal.abstention_threshold(uncertainty, correct, 0.05, 0.1) == 1.0  # no errors: accept all
    correct[:5] = False  # the least uncertain rows are wrong: the sequence stops at its first test
    assert conformal.abstention_threshold(uncertainty, correct, 0.05, 0.1) == -math.inf


@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5, float("nan"), True, "0.1"])
def test_levels_outside_zero_one_are_refused_by_name(value):
    with pytest.raises(ValueError, match="alpha must be a number strictly between 0 and 1"):
        conformal.check_level("alpha", value)
