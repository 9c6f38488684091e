"""Dropout-regularized networks: the classic Keras MLP, the MC-dropout regression net, a small CNN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
import numpy as np

from training.artifact import Likelihood, Task
from training.concrete import ConcreteDropout, ConcreteL2, concrete_regularizers


@dataclass(frozen=True)
class ModelConfig:
    """Network shape and regularization. One dropout rate applies to every hidden layer."""

    architecture: Literal["dense", "conv"] = "dense"
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.5
    input_dropout: float = 0.0
    conv_filters: tuple[int, ...] = (32, 64)
    spatial_dropout: float = 0.25
    weight_decay: float | tuple[float, ...] = 0.0
    """L2 factor on every Dense/Conv kernel, or one per kernel in order (see ``mc_weight_decay``)."""
    learning_rate: float = 1e-3
    concrete: bool = False
    """Learn the dense layers' dropout rates (Concrete Dropout); ``dropout``/``input_dropout`` are the start."""
    concrete_rows: int = 1000
    """Training rows N, for the concrete regularizers ``l² / (τN)`` (weights) and ``2 / (τN)`` (rates)."""
    concrete_tau: float = 1.0
    """τ of the concrete regularizers: a homoscedastic regression network's noise precision in the units it
    trains in (standardized targets; see ``training.train``), 1 for classifiers and heteroscedastic networks."""


CLASSIFIER_WEIGHT_DECAY = 1e-4
"""``python -m training``'s L2 factor on a classifier's kernels: fewer confidently wrong digits, so more of them
pass abstention at a 1 % risk; chosen on validation rows (docs/conformal.md, "A better model")."""


def mc_weight_decay(config: ModelConfig, rows: int, tau: float, length_scale: float = 1e-2) -> tuple[float, ...]:
    """Gal & Ghahramani's weight decay ``l² (1 - p) / (2 N tau)`` for each Dense kernel.

    ``p`` is the dropout rate on that layer's input: ``input_dropout`` for the first layer,
    ``dropout`` for the ones after a hidden layer.
    """
    rates = [config.input_dropout] + [config.dropout] * len(config.hidden)
    return tuple(length_scale**2 * (1 - p) / (2 * rows * tau) for p in rates)


DEFAULT_BETA = 0.5
"""β of the β-NLL for heteroscedastic networks (Seitzer et al. 2022's recommendation; 0 = plain NLL)."""


def gaussian_nll(y, mean, log_variance, beta: float = 0.0):
    """Per-instance Gaussian negative log-likelihood without the constant ½ log 2π (Kendall & Gal 2017).

    ``½ exp(-s) (y - mean)² + ½ s`` with ``s`` the predicted log-variance, averaged over the last axis.
    ``beta > 0`` weights each term by ``stop_gradient(variance^β)`` (β-NLL, Seitzer et al., ICLR 2022): the
    same optimum per instance, but instances the network calls noisy no longer stop the mean from
    learning (plain NLL scales the mean's gradient by 1 / variance, which leaves the mean underfit).
    """
    nll = 0.5 * keras.ops.exp(-log_variance) * keras.ops.square(y - mean) + 0.5 * log_variance
    if beta:
        nll = nll * keras.ops.stop_gradient(keras.ops.exp(beta * log_variance))
    return keras.ops.mean(nll, -1)


def heteroscedastic_loss(beta: float = DEFAULT_BETA):
    """Keras loss of a heteroscedastic network: ``y_pred`` is ``[mean (D), log-variance (D)]``."""

    def loss(y_true, y_pred):
        mean, log_variance = keras.ops.split(y_pred, 2, axis=-1)
        y_true = keras.ops.reshape(keras.ops.cast(y_true, y_pred.dtype), keras.ops.shape(mean))  # [N] -> [N, 1]
        return gaussian_nll(y_true, mean, log_variance, beta)

    return loss


def build_network(
    config: ModelConfig,
    input_shape: tuple[int, ...],
    outputs: int,
    task: Task,
    likelihood: Likelihood = "homoscedastic",
    beta: float = DEFAULT_BETA,
) -> keras.Model:
    """The trainable network; it expects preprocessed inputs (see ``with_preprocessing``).

    A heteroscedastic regression network has ``2 * outputs`` outputs: the means, then the
    log-variances, both in standardized target units; it trains with ``heteroscedastic_loss``.
    """
    heteroscedastic = task == "regression" and likelihood == "heteroscedastic"
    per_kernel = iter(config.weight_decay) if isinstance(config.weight_decay, tuple) else None

    def regularizer():
        factor = config.weight_decay if per_kernel is None else next(per_kernel, 0.0)
        return keras.regularizers.L2(factor) if factor else None

    inputs = keras.Input(input_shape, name="features")
    x = inputs
    if config.architecture == "conv":
        if len(input_shape) == 2:
            x = keras.layers.Reshape((*input_shape, 1))(x)
        for filters in config.conv_filters:
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_regularizer=regularizer())(x)
            x = keras.layers.SpatialDropout2D(config.spatial_dropout)(x)
            if min(x.shape[1:3]) >= 4:
                x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Flatten()(x)
    feeding: ConcreteDropout | None = None  # the concrete dropout layer in front of the next kernel
    weight_factor, rate_factor = concrete_regularizers(config.concrete_rows, tau=config.concrete_tau)

    def dropout(rate: float):
        nonlocal feeding
        if config.concrete:
            feeding = ConcreteDropout(rate, dropout_regularizer=rate_factor)
            return feeding
        return keras.layers.Dropout(rate)

    def kernel_regularizer():
        nonlocal feeding
        if feeding is None:
            return regularizer()
        fed, feeding = feeding, None
        return ConcreteL2(weight_factor, fed)

    if config.input_dropout:
        x = dropout(config.input_dropout)(x)
    for units in config.hidden:
        x = keras.layers.Dense(units, activation="relu", kernel_regularizer=kernel_regularizer())(x)
        x = dropout(config.dropout)(x)
    activation = "softmax" if task == "classification" else None
    width = 2 * outputs if heteroscedastic else outputs
    outputs = keras.layers.Dense(width, activation=activation, kernel_regularizer=kernel_regularizer())(x)
    model = keras.Model(inputs, outputs, name=f"{config.architecture}_dropout_net")
    if task == "classification":
        loss = "sparse_categorical_crossentropy"
    else:
        loss = heteroscedastic_loss(beta) if heteroscedastic else "mean_squared_error"
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=loss,
        metrics=["accuracy"] if task == "classification" else None,
    )
    return model


class GaussianOutput(keras.layers.Layer):
    """Standardized ``[mean, log-variance]`` to target units ``[mean, variance]`` (heteroscedastic head)."""

    def __init__(self, shift: np.ndarray, scale: np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shift = np.asarray(shift, np.float32)
        self.scale = np.asarray(scale, np.float32)

    def call(self, inputs):
        mean, log_variance = keras.ops.split(inputs, 2, axis=-1)
        variance = keras.ops.exp(log_variance) * keras.ops.square(self.scale)
        return keras.ops.concatenate([mean * self.scale + self.shift, variance], axis=-1)


def with_preprocessing(
    network: keras.Model,
    input_shift: np.ndarray,
    input_scale: np.ndarray,
    target_shift: np.ndarray | None = None,
    target_scale: np.ndarray | None = None,
    likelihood: Likelihood = "homoscedastic",
) -> keras.Model:
    """The served model: raw features in, probabilities or target-unit values out.

    It shares the network's layers and weights, so exporting it puts the scaling in the graph.
    A heteroscedastic network's served model outputs ``[mean (D), variance (D)]`` in target units;
    ``export_model(..., likelihood="heteroscedastic")`` splits them into the signatures' two keys.
    """
    inputs = keras.Input(network.input_shape[1:], name="raw_features")
    x = keras.layers.Rescaling(1.0 / input_scale, offset=-input_shift / input_scale, name="scale_inputs")(inputs)
    outputs = network(x)
    if likelihood == "heteroscedastic":
        width = outputs.shape[-1] // 2
        shift = np.zeros(width) if target_shift is None else target_shift
        scale = np.ones(width) if target_scale is None else target_scale
        outputs = GaussianOutput(shift, scale, name="gaussian_in_target_units")(outputs)
    elif target_scale is not None:
        outputs = keras.layers.Rescaling(target_scale, offset=target_shift, name="restore_target_units")(outputs)
    return keras.Model(inputs, outputs, name=network.name)
