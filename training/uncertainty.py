"""Summaries of Monte-Carlo dropout samples: what a client reads from ``/predict/mc-dropout``.

Plain NumPy over samples shaped ``[T, N, ...]`` (T samples of N instances), shared by the
service and by the evaluation report. Entropies are in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054
"""Two-sided 95 % quantile of the standard normal."""


def sample_mean(values: np.ndarray) -> np.ndarray:
    """The mean over the sample axis 0 of ``values [T, N, ...]``, each instance's the same bits whatever else
    ``values`` holds.

    NumPy's ``mean(axis=0)`` sums a row at a time when the instances fill a row but pairwise when one
    instance's values are the whole array, so an instance's mean would depend on whether it was summarized
    alone or beside other requests' (MC batching summarizes a call's requests together). Here every
    value's T draws are laid out contiguously and summed pairwise, one run per value, however many runs.
    """
    return _run_mean(_runs(values))


def _runs(values: np.ndarray) -> np.ndarray:
    """``values [T, N, ...]`` as float64 ``[N, ..., T]``, each value's T draws contiguous (``sample_mean``)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(values, dtype=np.float64), 0, -1))


def _run_mean(runs: np.ndarray) -> np.ndarray:
    """``sample_mean`` of values already laid out by ``_runs``."""
    return np.add.reduce(runs, axis=-1) / runs.shape[-1]


def sample_std(values: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """The standard deviation over the sample axis 0 (``ddof = 0``), layout-invariant as ``sample_mean``."""
    mean = sample_mean(values) if mean is None else mean
    return np.sqrt(sample_mean((values - mean) ** 2))


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy over the last axis (0 log 0 = 0). NumPy only: the server imports this module,
    and serving needs no SciPy."""
    probabilities = np.asarray(probabilities)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.log(probabilities)
        terms *= probabilities  # in place: the same bits as p * log(p), one array fewer
    np.copyto(terms, 0.0, where=probabilities == 0)
    return -terms.sum(axis=-1)


def tempered(mean: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(mean) / temperature)`` over the last axis: a temperature-calibrated predictive from the MC
    mean ``[N, K]`` (``training.draws.calibrated_predictive``)."""
    log_mean = np.log(np.maximum(mean, 1e-30)) / temperature
    scaled = np.exp(log_mean - log_mean.max(axis=-1, keepdims=True))
    return scaled / scaled.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class ClassificationSummary:
    """Per instance. ``mean`` is the calibrated predictive when the model has one; the entropies are
    the raw samples' own, so predictive entropy = expected entropy + mutual information still holds
    (a temperature on the predictive would break that decomposition)."""

    mean: np.ndarray  # [N, K] the MC predictive: mean probabilities, or their calibrated form
    std: np.ndarray  # [N, K] per-class standard deviation over samples
    label: np.ndarray  # [N] argmax of the mean
    probability: np.ndarray  # [N] mean probability of that label
    predictive_entropy: np.ndarray  # [N] H[mean_t p_t] of the samples: total uncertainty
    expected_entropy: np.ndarray  # [N] mean_t H[p_t]: aleatoric part
    mutual_information: np.ndarray  # [N] BALD, their difference: epistemic part
    variation_ratio: np.ndarray  # [N] share of samples whose argmax is not the modal label


def summarize_classification(
    samples: np.ndarray, predictive: np.ndarray | None = None, temperature: float | None = None
) -> ClassificationSummary:
    """Summaries of ``samples [T, N, K]``; ``predictive [N, K]`` (``mc_dropout``'s calibrated
    predictive), or else a ``temperature`` to calibrate the samples' mean with (``tempered``), replaces the
    samples' mean as the answer's probabilities and label.

    Every value of instance ``i`` reads only ``samples[:, i]`` and is the same bits whatever other
    instances ``samples`` holds (``sample_mean``), so requests can be summarized together."""
    samples = np.ascontiguousarray(samples, dtype=np.float64)
    count, classes = samples.shape[0], samples.shape[-1]
    runs = _runs(samples)  # laid out once for the mean and the std
    raw_mean = _run_mean(runs)
    if predictive is not None:
        mean = np.asarray(predictive, dtype=np.float64)
    else:
        mean = raw_mean if temperature is None else tempered(raw_mean, temperature)
    label = mean.argmax(axis=-1)
    total = entropy(raw_mean)
    expected = sample_mean(entropy(samples))
    deviations = runs - raw_mean[..., None]  # (runs may be a view of samples: T = 1)
    votes = samples.argmax(axis=-1)  # [T, N]
    instances = votes.shape[1]
    counts = np.bincount((votes + classes * np.arange(instances)).ravel(), minlength=instances * classes)
    modal_count = counts.reshape(instances, classes).max(axis=-1, initial=0)  # bins of each instance's own
    return ClassificationSummary(
        mean=mean,
        std=np.sqrt(_run_mean(np.square(deviations, out=deviations))),  # sample_std's bits
        label=label,
        probability=mean[np.arange(len(label)), label],
        predictive_entropy=total,
        expected_entropy=expected,
        mutual_information=np.maximum(total - expected, 0.0),
        variation_ratio=1.0 - modal_count / count,
    )


def _scalar_or_list(values: np.ndarray) -> float | list:
    return float(values[0]) if values.shape == (1,) else values.tolist()


@dataclass(frozen=True)
class RegressionSummary:
    mean: np.ndarray  # [N, D]
    epistemic_std: np.ndarray  # [N, D] spread of the sampled (mean) predictions
    aleatoric_std: float | np.ndarray | None
    """1 / sqrt(tau), the same for every instance (homoscedastic); or [N, D] per instance
    (heteroscedastic): the square root of the predicted variance averaged over the samples."""
    total_std: np.ndarray  # [N, D] sqrt(epistemic² + aleatoric²)
    lower: np.ndarray  # [N, D] 95 % interval, Gaussian approximation
    upper: np.ndarray

    def answer(self, i: int) -> dict[str, float | list | None]:
        """Instance ``i`` as the MC endpoint's regression answer (one output: numbers, else lists)."""
        aleatoric = self.aleatoric_std
        return {
            "mean": _scalar_or_list(self.mean[i]),
            "epistemic_std": _scalar_or_list(self.epistemic_std[i]),
            "aleatoric_std": _scalar_or_list(aleatoric[i]) if isinstance(aleatoric, np.ndarray) else aleatoric,
            "total_std": _scalar_or_list(self.total_std[i]),
            "interval_95": [_scalar_or_list(self.lower[i]), _scalar_or_list(self.upper[i])],
        }


def summarize_regression(
    samples: np.ndarray, tau: float | None, variance: np.ndarray | None = None
) -> RegressionSummary:
    """Mean, epistemic / aleatoric / total std and a 95 % interval from ``samples [T, N, ...]``.

    Aleatoric noise is ``1 / sqrt(tau)`` for a homoscedastic model, or, given the sampled
    predicted variances ``variance [T, N, ...]`` of a heteroscedastic one, ``sqrt(mean_t σ²_t)``
    per instance (Kendall & Gal 2017: total variance = mean σ² + variance of the sampled means).
    """
    samples = np.ascontiguousarray(samples, dtype=np.float64)
    samples = samples.reshape(samples.shape[0], samples.shape[1], -1)
    mean = sample_mean(samples)
    epistemic = sample_std(samples, mean)
    if variance is not None:
        variance = np.asarray(variance, dtype=np.float64).reshape(samples.shape)
        aleatoric: float | np.ndarray | None = np.sqrt(sample_mean(variance))
    else:
        aleatoric = None if tau is None else float(1.0 / np.sqrt(tau))
    total = np.sqrt(epistemic**2 + (0.0 if aleatoric is None else aleatoric) ** 2)
    return RegressionSummary(
        mean=mean,
        epistemic_std=epistemic,
        aleatoric_std=aleatoric,
        total_std=total,
        lower=mean - Z_95 * total,
        upper=mean + Z_95 * total,
    )
