"""Fit a dropout network on a dataset and score it on held-out data, deterministically per seed."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace

import keras
import numpy as np
import tensorflow as tf

from training import metrics, outliers
from training.artifact import Likelihood, Preprocessing
from training.calibration import fit_calibration
from training.data import Dataset, split
from training.mc_dropout import sample
from training.model import ModelConfig, build_network, mc_weight_decay, with_preprocessing


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 300
    batch_size: int = 32
    validation_split: float = 0.1
    test_split: float = 0.2
    calibration_split: float = 0.2
    """Share of the training rows held out for conformal calibration (``calibration_rows``); 0: none."""
    calibration_from_test: float = 0.5
    """Share of the test rows that become calibration rows too (``split_rows``): more rows to certify a risk
    with, at no cost to the model; 0: the test rows stay whole."""
    seed: int = 0
    tau: float | None = None
    """Regression model precision; None fits it on the validation rows after training."""
    mc_samples: int = 100
    """MC samples for the held-out scores (and for fitting the MC temperature)."""
    likelihood: Likelihood = "homoscedastic"
    """Regression: one noise level tau, or a predicted variance per instance (heteroscedastic, no tau)."""
    beta: float = 0.5
    """Heteroscedastic: β of the β-NLL (``training.model.gaussian_nll``; 0 = Kendall & Gal's plain NLL)."""
    calibrate: bool = True
    """Classifiers: fit a temperature for the deterministic and one for the MC predictive on the validation rows."""
    outlier_weight: float = 0.5
    """Classifiers: weight of the outlier-disagreement term (``training.outliers``); 0 trains on the real rows only."""
    shift_augment: bool = False
    """Image classifiers with the outlier term: train on rows shifted by up to one pixel (``outliers.shifted``)."""


@dataclass
class TrainedModel:
    model: keras.Model
    """Raw features in, class probabilities or target-unit predictions out."""
    preprocessing: Preprocessing
    history: dict[str, list[float]]
    metrics: dict[str, dict[str, float]]
    tau: float | None = None
    temperature: float | None = None
    """Classifier temperature of the inference-mode prediction (None: not calibrated)."""
    predictive_temperature: float | None = None
    """Classifier temperature of the MC predictive, applied after averaging the samples (None: not calibrated)."""
    test: Dataset | None = field(default=None, repr=False)
    calibration: Dataset | None = field(default=None, repr=False)
    """Rows nothing was fitted on (not the weights, temperatures or tau), for ``training.conformity``."""


def _input_scaling(data: Dataset, config: ModelConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Shift and scale that put the features near [0, 1] or at zero mean and unit variance."""
    if data.value_range is not None:
        return np.zeros(1), np.full(1, data.value_range), f"x / {data.value_range:g}"
    if config.architecture == "conv":
        return np.full(1, data.x.mean()), np.full(1, data.x.std() or 1.0), "standardized (one mean, one std)"
    std = data.x.std(axis=0)
    return data.x.mean(axis=0), np.where(std > 0, std, 1.0), "standardized per feature (training mean, std)"


def train(data: Dataset, config: ModelConfig, settings: TrainConfig) -> TrainedModel:
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    rows = split_rows(data, settings.__dict__)
    fit_rows, validation, calibration, test = rows.fit, rows.validation, rows.calibration, rows.test

    shift, scale, description = _input_scaling(fit_rows, config)
    preprocessing = Preprocessing(inputs=description, input_shift=shift.tolist(), input_scale=scale.tolist())
    x_fit, x_val = (fit_rows.x - shift) / scale, (validation.x - shift) / scale
    y_fit, y_val = fit_rows.y, validation.y
    outputs = len(data.class_labels) if data.task == "classification" else data.y.shape[1]
    heteroscedastic = data.task == "regression" and settings.likelihood == "heteroscedastic"
    if heteroscedastic and settings.tau is not None:
        raise ValueError("a heteroscedastic model predicts its own noise: --tau does not apply")
    concrete_tau = 1.0  # classifiers and heteroscedastic networks: the loss is the whole NLL
    if data.task == "regression":
        y_shift, y_scale = (
            fit_rows.y.mean(axis=0),
            np.where(fit_rows.y.std(axis=0) > 0, fit_rows.y.std(axis=0), 1.0),
        )
        y_fit, y_val = (y_fit - y_shift) / y_scale, (y_val - y_shift) / y_scale
        preprocessing.outputs = "network predicts the standardized target; the graph restores its units"
        preprocessing.target_shift, preprocessing.target_scale = y_shift.tolist(), y_scale.tolist()
        if not config.weight_decay:
            # Heteroscedastic: the NLL carries the noise, so λ is the KL term l²(1-p)/(2N) (tau 1).
            prior_tau = 1.0 if heteroscedastic else settings.tau or float(1.0 / np.mean(y_scale**2))
            config = replace(config, weight_decay=mc_weight_decay(config, len(y_fit), prior_tau))
        if settings.tau and not heteroscedastic:
            # The network trains on the MSE of the standardized target, the Gaussian NLL divided by τ/2, so the
            # concrete regularizers are divided by the prior τ in those units, τ·y_std² (as training.uci.protocol
            # does). Without --tau the prior above is 1/y_std² (target units): 1 in standardized units, the default.
            concrete_tau = settings.tau * float(np.mean(y_scale**2))

    if config.concrete:
        config = replace(config, concrete_rows=len(fit_rows.y), concrete_tau=concrete_tau)
    network = build_network(config, data.x.shape[1:], outputs, data.task, settings.likelihood, settings.beta)
    verbose = 1 if sys.stdout.isatty() else 2
    if data.task == "classification" and settings.outlier_weight:
        history = outliers.fit(
            network,
            x_fit,
            y_fit,
            (x_val, y_val),
            weight=settings.outlier_weight,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            learning_rate=config.learning_rate,
            seed=settings.seed,
            verbose=verbose,
            image_shape=image_shape(data) if settings.shift_augment else None,
        )
    else:
        if settings.shift_augment:
            raise ValueError("shift augmentation is part of the outlier-disagreement training (outlier weight > 0)")
        history = network.fit(
            x_fit,
            y_fit,
            validation_data=(x_val, y_val),
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            shuffle=True,
            verbose=verbose,
        ).history
    if data.task == "classification":
        served = with_preprocessing(network, shift, scale)
    else:
        served = with_preprocessing(network, shift, scale, y_shift, y_scale, settings.likelihood)

    fitted = fit_calibration(
        served,
        validation.x,
        validation.y,
        data.task,
        likelihood=settings.likelihood,
        samples=settings.mc_samples,
        seed=settings.seed,
        tau=settings.tau,
        temperatures=settings.calibrate,
    )
    scores = evaluate(
        served,
        test,
        data.task,
        fitted.tau,
        settings.mc_samples,
        settings.seed,
        fitted.temperature,
        fitted.predictive_temperature,
    )
    history = {k: [float(v) for v in vs] for k, vs in history.items()}
    return TrainedModel(
        served,
        preprocessing,
        history,
        scores,
        fitted.tau,
        fitted.temperature,
        fitted.predictive_temperature,
        test,
        calibration,
    )


def image_shape(data: Dataset) -> tuple[int, int]:
    """Height and width of image rows: ``[H, W, C]`` inputs, or square pixel rows of a known value range (digits)."""
    if data.x.ndim == 4 and data.x.shape[3] == 1:
        return int(data.x.shape[1]), int(data.x.shape[2])
    side = math.isqrt(data.x.shape[1]) if data.x.ndim == 2 else 0
    if data.value_range is None or side * side != data.x.shape[1]:
        shape = list(data.x.shape[1:])
        raise ValueError(f"{data.name}: shift augmentation needs one-channel image rows, got inputs of shape {shape}")
    return side, side


@dataclass(frozen=True)
class Rows:
    """A data set's rows by the part they play; ``train`` is every row but the test share's (fit, validation
    and the calibration rows taken from it)."""

    train: Dataset
    fit: Dataset
    validation: Dataset
    calibration: Dataset | None
    test: Dataset


def split_rows(data: Dataset, fit: dict) -> Rows:
    """Split ``data`` as the training settings ``fit`` (``TrainConfig`` fields, as stored in the metadata) say.

    Test rows first, then validation rows, then calibration rows from the training rows
    (``calibration_rows``), each stratified and seeded, so the weights, temperatures and tau are fitted
    exactly as without calibration_from_test. Then ``calibration_from_test`` of the test rows join the
    calibration rows: nothing was fitted on them either, so the union is still exchangeable with fresh rows,
    and the model is the same whatever the share. Settings missing from ``fit`` (older metadata) take
    the values that version was trained with.
    """
    seed, validation_split = fit.get("seed", 0), fit.get("validation_split", 0.1)
    train_rows, test = split(data, fit.get("test_split", 0.2), seed)
    fit_rows, validation = split(train_rows, validation_split, seed)
    fit_rows, calibration = calibration_rows(fit_rows, fit.get("calibration_split", 0.0), validation_split, seed)
    from_test = fit.get("calibration_from_test", 0.0)
    if from_test:
        if not 0.0 < from_test < 1.0:
            raise ValueError("calibration_from_test must leave test rows and take some (strictly between 0 and 1)")
        test, moved = split(test, from_test, seed)
        calibration = moved if calibration is None else _joined(calibration, moved)
    return Rows(train_rows, fit_rows, validation, calibration, test)


def _joined(first: Dataset, second: Dataset) -> Dataset:
    return replace(first, x=np.concatenate([first.x, second.x]), y=np.concatenate([first.y, second.y]))


def calibration_rows(
    fit_rows: Dataset, calibration_split: float, validation_split: float, seed: int
) -> tuple[Dataset, Dataset | None]:
    """Split conformal calibration rows off the rows the weights would be fitted on.

    They are taken after the test and validation rows are split off (those stay the rows they were
    without calibration), so the weights, the temperatures and tau (fitted on the validation rows)
    never see them: their conformity scores are exchangeable with those of fresh rows from the same
    distribution, which is all the coverage guarantee needs. ``calibration_split`` is a share of the
    training rows (test rows excluded), as ``validation_split`` is.
    """
    if not calibration_split:
        return fit_rows, None
    share = calibration_split / (1.0 - validation_split)
    if not 0.0 < share < 1.0:
        raise ValueError("calibration and validation splits must together leave rows to train on")
    return split(fit_rows, share, seed)


def evaluate(
    model: keras.Model,
    data: Dataset,
    task: str,
    tau: float | None,
    samples: int,
    seed: int,
    temperature: float | None = None,
    predictive_temperature: float | None = None,
):
    """Held-out scores of inference-mode ("deterministic") and MC-dropout ("mc") predictions.

    A calibrated classifier is scored as served (tempered); the raw scores are kept as ``*_uncalibrated``.
    """
    deterministic = model(data.x, training=False).numpy()
    mc = sample(model, data.x, samples, seed)
    if task == "regression" and tau is None:  # heteroscedastic: [mean, variance] in target units
        mean, variance = np.split(deterministic, 2, axis=-1)
        mc_mean, mc_variance = np.split(mc, 2, axis=-1)
        return {
            "test_deterministic": {
                "rmse": metrics.rmse(mean, data.y),
                "log_likelihood": metrics.gaussian_mixture_log_likelihood(data.y, mean[None], variance[None]),
            },
            "test_mc": {
                "rmse": metrics.rmse(mc_mean.mean(axis=0), data.y),
                "log_likelihood": metrics.gaussian_mixture_log_likelihood(data.y, mc_mean, mc_variance),
            },
        }
    if task == "classification":
        scores = {
            "test_deterministic": metrics.classification_scores(deterministic, data.y),
            "test_mc": metrics.classification_scores(mc.mean(axis=0), data.y),
        }
        if temperature is None and predictive_temperature is None:
            return scores
        return {
            "test_deterministic": metrics.classification_scores(metrics.temper(deterministic, temperature), data.y),
            "test_mc": metrics.classification_scores(metrics.temper(mc.mean(axis=0), predictive_temperature), data.y),
            "test_deterministic_uncalibrated": scores["test_deterministic"],
            "test_mc_uncalibrated": scores["test_mc"],
        }
    return {
        "test_deterministic": metrics.regression_scores(data.y, deterministic, None, tau),
        "test_mc": metrics.regression_scores(data.y, mc.mean(axis=0), mc, tau),
    }
