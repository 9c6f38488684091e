"""Outlier disagreement: train the dropout sub-networks to disagree on inputs unlike the data.

MC dropout flags an input as unfamiliar through the mutual information between the prediction
and the sampled sub-network: it is high only where the samples disagree. A ReLU network trained
on digits alone extrapolates confidently, and its sub-networks extrapolate alike: at some seeds
the classic digits network calls half or more of the inverted digits a "4" with all samples
agreeing (docs/benchmarks.md). Outlier exposure (Hendrycks et al., ICLR 2019) trains on outliers with a
uniform target, but a uniform target for every sub-network makes the samples *agree* on the
outliers: predictive entropy rises while mutual information drops to zero, so the epistemic
score the MC endpoint reports stops flagging them. The outlier term here instead maximizes the
mutual information of two independently masked passes, as Jain et al. (AAAI 2020) maximize the
disagreement of an ensemble away from the data; the samples disagree where no data constrains
them, while the real rows keep their usual loss.

The outliers are made from each training batch: every row's features in a random order, drawn
afresh at every step. They keep the value histogram of real inputs and none of their structure,
and are modelled on no particular kind of unfamiliar input.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

OUTLIER = -1
"""The label that marks a synthetic outlier row in a training batch."""


def permuted(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each row of ``x`` with its features (pixels) in its own random order, from a stateless ``seed [2]``."""
    flat = tf.reshape(x, [tf.shape(x)[0], -1])
    order = tf.argsort(tf.random.stateless_uniform(tf.shape(flat), seed=seed), axis=1)
    return tf.reshape(tf.gather(flat, order, batch_dims=1), tf.shape(x))


def shifted(x: tf.Tensor, image_shape: tuple[int, int], seed: tf.Tensor) -> tf.Tensor:
    """Each row's image moved by -1, 0 or +1 pixels down and across (zero fill), from a stateless ``seed [2]``."""
    height, width = image_shape
    padded = tf.pad(tf.reshape(x, [-1, height, width]), [[0, 0], [1, 1], [1, 1]])
    moves = tf.stack([padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=1)
    pick = tf.random.stateless_uniform([tf.shape(x)[0]], seed=seed, maxval=9, dtype=tf.int32)
    return tf.reshape(tf.gather(moves, pick, batch_dims=1), tf.shape(x))


def two_pass_mutual_information(first: tf.Tensor, second: tf.Tensor) -> tf.Tensor:
    """``H[(p1 + p2) / 2] - (H[p1] + H[p2]) / 2`` per row: 0 when the passes agree, up to log 2."""

    def entropy(p: tf.Tensor) -> tf.Tensor:
        return -tf.reduce_sum(p * tf.math.log(p), axis=-1)

    first, second = tf.clip_by_value(first, 1e-7, 1.0), tf.clip_by_value(second, 1e-7, 1.0)
    return entropy(0.5 * (first + second)) - 0.5 * (entropy(first) + entropy(second))


def disagreement_loss(weight: float):
    """Keras loss on ``[p1, p2]`` (two dropout passes, concatenated): cross-entropy of the first pass
    on the real rows, minus ``weight`` times the two-pass mutual information on the outlier rows.

    Each term is averaged over its own rows (Keras' mean over the batch, reweighted), so the real
    rows' term has the scale of plain training whatever share of the batch the outliers are.
    """

    def loss(y_true, y_pred):
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        first, second = tf.split(y_pred, 2, axis=-1)
        real = labels != OUTLIER
        rows = tf.cast(tf.size(labels), y_pred.dtype)
        real_rows = tf.reduce_sum(tf.cast(real, y_pred.dtype))
        picked = tf.gather(first, tf.maximum(labels, 0), batch_dims=1)
        cross_entropy = -tf.math.log(tf.clip_by_value(picked, 1e-7, 1.0))
        disagreement = two_pass_mutual_information(first, second)
        return tf.where(
            real,
            rows / tf.maximum(real_rows, 1.0) * cross_entropy,
            -weight * rows / tf.maximum(rows - real_rows, 1.0) * disagreement,
        )

    return loss


class RealRowAccuracy(keras.metrics.Mean):
    """Accuracy of the first pass on the real rows of a ``[p1, p2]`` output (outlier rows have no class)."""

    def __init__(self, name: str = "accuracy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        first, _ = tf.split(y_pred, 2, axis=-1)
        correct = tf.cast(tf.equal(tf.argmax(first, axis=-1, output_type=tf.int32), labels), y_pred.dtype)
        return super().update_state(correct, sample_weight=tf.cast(labels != OUTLIER, y_pred.dtype))


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int, seed: int, image_shape: tuple[int, int] | None = None
) -> tf.data.Dataset:
    """Shuffled batches of the real rows, each followed by as many fresh outliers made from them.

    Labels of the outliers are ``OUTLIER``. A step's permutations depend only on ``(seed, step)``. With
    ``image_shape`` the real rows are images, each ``shifted`` afresh at every step (augmentation).
    """
    rows = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y.astype(np.int64)))
    shuffled = rows.shuffle(len(y), seed=seed, reshuffle_each_iteration=True).batch(batch_size).repeat(epochs)

    def with_outliers(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        features, labels = batch
        if image_shape is not None:
            features = shifted(features, image_shape, tf.stack([tf.constant(-seed - 1, tf.int64), step]))
        outliers = permuted(features, tf.stack([tf.constant(seed, tf.int64), step]))
        return tf.concat([features, outliers], 0), tf.concat([labels, tf.fill(tf.shape(labels), np.int64(OUTLIER))], 0)

    return shuffled.enumerate().map(with_outliers).prefetch(2)


def fit(
    network: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    *,
    weight: float,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    verbose: int,
    image_shape: tuple[int, int] | None = None,
) -> dict[str, list[float]]:
    """Train ``network`` (a softmax classifier with dropout) with the outlier term; its history.

    The network is trained through a wrapper that runs it twice on every batch, each pass with
    its own dropout masks; the validation scores are the network's own (inference mode). ``image_shape``:
    train on images shifted by up to a pixel (``batches``).
    """
    features = keras.Input(network.input_shape[1:])
    both = keras.layers.Concatenate(name="two_passes")([network(features), network(features)])
    trainer = keras.Model(features, both, name="outlier_disagreement")
    trainer.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=disagreement_loss(weight),
        metrics=[RealRowAccuracy()],
    )
    return trainer.fit(
        batches(x, y, batch_size, epochs, seed, image_shape),
        validation_data=validation,
        epochs=epochs,
        steps_per_epoch=math.ceil(len(y) / batch_size),
        shuffle=False,  # the batches are shuffled by ``batches``
        verbose=verbose,
    ).history
