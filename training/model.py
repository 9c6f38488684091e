"""Dropout-regularized networks: the classic Keras MLP, the MC-dropout regression net, a small CNN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras
import numpy as np

from training.artifact import Task


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


def mc_weight_decay(config: ModelConfig, rows: int, tau: float, length_scale: float = 1e-2) -> tuple[float, ...]:
    """Gal & Ghahramani's weight decay ``l² (1 - p) / (2 N tau)`` for each Dense kernel.

    ``p`` is the dropout rate on that layer's input: ``input_dropout`` for the first layer,
    ``dropout`` for the ones after a hidden layer.
    """
    rates = [config.input_dropout] + [config.dropout] * len(config.hidden)
    return tuple(length_scale**2 * (1 - p) / (2 * rows * tau) for p in rates)


def build_network(config: ModelConfig, input_shape: tuple[int, ...], outputs: int, task: Task) -> keras.Model:
    """The trainable network; it expects preprocessed inputs (see ``with_preprocessing``)."""
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
    if config.input_dropout:
        x = keras.layers.Dropout(config.input_dropout)(x)
    for units in config.hidden:
        x = keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer())(x)
        x = keras.layers.Dropout(config.dropout)(x)
    activation = "softmax" if task == "classification" else None
    outputs = keras.layers.Dense(outputs, activation=activation, kernel_regularizer=regularizer())(x)
    model = keras.Model(inputs, outputs, name=f"{config.architecture}_dropout_net")
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy" if task == "classification" else "mean_squared_error",
        metrics=["accuracy"] if task == "classification" else None,
    )
    return model


def with_preprocessing(
    network: keras.Model,
    input_shift: np.ndarray,
    input_scale: np.ndarray,
    target_shift: np.ndarray | None = None,
    target_scale: np.ndarray | None = None,
) -> keras.Model:
    """The served model: raw features in, probabilities or target-unit values out.

    It shares the network's layers and weights, so exporting it puts the scaling in the graph.
    """
    inputs = keras.Input(network.input_shape[1:], name="raw_features")
    x = keras.layers.Rescaling(1.0 / input_scale, offset=-input_shift / input_scale, name="scale_inputs")(inputs)
    outputs = network(x)
    if target_scale is not None:
        outputs = keras.layers.Rescaling(target_scale, offset=target_shift, name="restore_target_units")(outputs)
    return keras.Model(inputs, outputs, name=network.name)
