"""Calibration: what an artifact stores, beside its weights, so that served uncertainty means what it says.

One function fits all of it on rows nothing else was fitted on, for every path that publishes a model:
training (on its validation rows) and ``python -m training import`` (on the user's calibration data).
Anything calibration gains later is added here once and reaches both paths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np

from training import metrics
from training.artifact import Likelihood, Task
from training.mc_dropout import dropout_layers, sample


@dataclass(frozen=True)
class Calibration:
    """Fitted values, each None when it does not apply (or was not asked for)."""

    tau: float | None = None
    """Homoscedastic regression: model precision, 1 / aleatoric variance in target units."""
    temperature: float | None = None
    """Classification: temperature of the inference-mode prediction (``serving_default``)."""
    predictive_temperature: float | None = None
    """Classification: temperature of the MC predictive (``mc_dropout``'s ``predictive``)."""

    def export_arguments(self) -> dict[str, float | None]:
        """The keyword arguments of ``training.export.export_model`` that carry this calibration."""
        return asdict(self)


def fit_calibration(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    *,
    likelihood: Likelihood = "homoscedastic",
    samples: int = 100,
    seed: int = 0,
    tau: float | None = None,
    temperatures: bool = True,
) -> Calibration:
    """Fit the calibration of the served ``model`` (raw inputs in, probabilities or target units out).

    ``x, y`` are held-out rows: class indices for a classifier, ``[rows, outputs]`` targets for a
    regression model. A given ``tau`` is kept rather than fitted; ``temperatures=False`` leaves a
    classifier uncalibrated. MC quantities use the same sampler as the ``mc_dropout`` signature, so what
    is fitted is what is served. A model without dropout layers has no MC predictive: its tau is fitted
    on the inference-mode predictions and it gets no predictive temperature.
    """
    stochastic = bool(dropout_layers(model))
    if task == "classification":
        if not temperatures:
            return Calibration()
        deterministic = model(x, training=False).numpy()
        predictive = sample(model, x, samples, seed).mean(axis=0) if stochastic else None
        return Calibration(
            temperature=metrics.fit_temperature(deterministic, y),
            predictive_temperature=None if predictive is None else metrics.fit_temperature(predictive, y),
        )
    if likelihood == "heteroscedastic":  # the network predicts its own noise
        return Calibration()
    if tau is None:
        draws = sample(model, x, samples, seed) if stochastic else model(x, training=False).numpy()[None]
        tau = metrics.fit_tau(y, draws)
    return Calibration(tau=tau)
