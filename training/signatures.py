"""Calling an artifact's signatures: the client side of the contract in ``training.artifact``."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from training import artifact


def infer(
    signature, inputs: np.ndarray, input_key: str = artifact.INPUTS_KEY, output_key: str = artifact.OUTPUTS_KEY
) -> np.ndarray:
    """Inference-mode outputs ``[N, ...]`` from a ``serving_default`` signature."""
    return signature(**{input_key: tf.constant(inputs, tf.float32)})[output_key].numpy()


def mc_samples(signature, inputs: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """``samples`` MC-dropout outputs ``[T, N, ...]`` from an ``mc_dropout`` signature, in one call."""
    outputs = signature(
        **{
            artifact.INPUTS_KEY: tf.constant(inputs, tf.float32),
            artifact.SAMPLES_KEY: tf.constant(samples, tf.int32),
            artifact.SEED_KEY: tf.constant(seed, tf.int64),
        }
    )
    return outputs[artifact.OUTPUTS_KEY].numpy()
