"""Calling an artifact's signatures: the client side of the contract in ``training.artifact``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from training import artifact


class Samples(NamedTuple):
    """What one ``mc_dropout`` call returns: sampled outputs, per-sample variances and the calibrated
    predictive if it has them."""

    outputs: np.ndarray
    """``[T, N, ...]``: class probabilities, or predicted (mean) values."""
    variance: np.ndarray | None
    """``[T, N, ...]`` predicted aleatoric variance of a heteroscedastic model, else None."""
    predictive: np.ndarray | None = None
    """``[N, K]`` calibrated MC predictive of a temperature-calibrated classifier, else None."""


def infer(
    signature, inputs: np.ndarray, input_key: str = artifact.INPUTS_KEY, output_key: str = artifact.OUTPUTS_KEY
) -> np.ndarray:
    """Inference-mode outputs ``[N, ...]`` from a ``serving_default`` signature."""
    return signature(**{input_key: tf.constant(inputs, tf.float32)})[output_key].numpy()


def infer_variance(signature, inputs: np.ndarray) -> np.ndarray | None:
    """A heteroscedastic ``serving_default``'s predicted variance ``[N, ...]``; None if it has none."""
    if artifact.VARIANCE_KEY not in signature.structured_outputs:
        return None
    return signature(**{artifact.INPUTS_KEY: tf.constant(inputs, tf.float32)})[artifact.VARIANCE_KEY].numpy()


def mc_draws(signature, inputs: np.ndarray, samples: int, seed: int) -> Samples:
    """``samples`` MC-dropout draws from an ``mc_dropout`` signature, in one call (with variances and
    the calibrated predictive if any)."""
    outputs = signature(
        **{
            artifact.INPUTS_KEY: tf.constant(inputs, tf.float32),
            artifact.SAMPLES_KEY: tf.constant(samples, tf.int32),
            artifact.SEED_KEY: tf.constant(seed, tf.int64),
        }
    )
    variance, predictive = outputs.get(artifact.VARIANCE_KEY), outputs.get(artifact.PREDICTIVE_KEY)
    return Samples(
        outputs[artifact.OUTPUTS_KEY].numpy(),
        None if variance is None else variance.numpy(),
        None if predictive is None else predictive.numpy(),
    )
