"""Outlier disagreement (training/outliers.py): the outliers, the term, and what training with it does."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from training.outliers import OUTLIER, batches, disagreement_loss, permuted, shifted, two_pass_mutual_information


def test_permuted_rows_keep_their_values_in_a_new_order():
    x = tf.constant(np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1))
    first = permuted(x, tf.constant([3, 7], tf.int64)).numpy()
    assert first.shape == x.shape
    for row, original in zip(first, x.numpy(), strict=True):
        assert sorted(row.ravel()) == sorted(original.ravel())  # the same pixels ...
        assert not np.array_equal(row, original)  # ... elsewhere
    assert not np.array_equal(np.argsort(first[0].ravel()), np.argsort(first[1].ravel()))  # each row its own order
    np.testing.assert_array_equal(first, permuted(x, tf.constant([3, 7], tf.int64)).numpy())


def test_two_pass_mutual_information_by_hand():
    agree = tf.constant([[0.7, 0.2, 0.1]])
    assert abs(float(two_pass_mutual_information(agree, agree)[0])) < 1e-6
    one_hot_apart = two_pass_mutual_information(tf.constant([[1.0, 0.0]]), tf.constant([[0.0, 1.0]]))
    assert abs(float(one_hot_apart[0]) - math.log(2)) < 1e-5
    # H([0.5, 0.5]) - (H([0.8, 0.2]) + H([0.2, 0.8])) / 2
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    value = two_pass_mutual_information(tf.constant([[0.8, 0.2]]), tf.constant([[0.2, 0.8]]))
    assert abs(float(value[0]) - (math.log(2) - h)) < 1e-5


def test_loss_fits_real_rows_and_rewards_disagreement_on_outliers():
    loss = disagreement_loss(weight=0.5)
    labels = tf.constant([1, OUTLIER])
    passes = tf.constant([[0.25, 0.75, 0.75, 0.25], [1.0, 0.0, 0.0, 1.0]])  # rows: [p1 | p2]
    per_row = loss(labels, passes).numpy()
    # Real row: cross-entropy of the first pass, times 2 rows / 1 real row; outlier: -0.5 log 2 times 2 / 1.
    np.testing.assert_allclose(per_row, [-2 * math.log(0.75), -0.5 * 2 * math.log(2)], rtol=1e-5)


def test_batches_hold_each_real_batch_and_as_many_outliers():
    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    y = np.arange(10) % 3
    steps = list(batches(x, y, batch_size=4, epochs=2, seed=0))
    assert [len(labels) for _, labels in steps] == [8, 8, 4] * 2
    features, labels = steps[0]
    real = labels.numpy() != OUTLIER
    assert real.sum() == len(labels) // 2
    np.testing.assert_array_equal(np.sort(features.numpy()[~real], axis=1), np.sort(features.numpy()[real], axis=1))


def test_training_with_the_term_makes_mc_samples_disagree_on_outliers():
    """A tiny digits classifier: MC mutual information on unseen permuted digits, with and without."""
    from training.data import digits
    from training.mc_dropout import sample
    from training.model import ModelConfig
    from training.train import TrainConfig, train
    from training.uncertainty import summarize_classification

    data = digits()
    accuracy, mutual_information = {}, {}
    for weight in (0.0, 1.0):
        settings = TrainConfig(epochs=8, mc_samples=20, outlier_weight=weight)
        trained = train(data, ModelConfig(hidden=(32, 16)), settings)
        test = trained.test
        outliers = permuted(tf.constant(test.x), tf.constant([99, 1], tf.int64)).numpy()
        samples = sample(trained.model, np.r_[test.x, outliers], 50, seed=5)
        information = summarize_classification(samples).mutual_information
        mutual_information[weight] = information[: len(test.x)].mean(), information[len(test.x) :].mean()
        accuracy[weight] = trained.metrics["test_deterministic"]["accuracy"]
    assert accuracy[1.0] > accuracy[0.0] - 0.05  # the real rows are learned about as well
    real, unseen = mutual_information[1.0]
    assert unseen > 3 * mutual_information[0.0][1]  # the samples disagree on outliers they never saw ...
    assert unseen > 3 * real  # ... far more than on real digits


def test_shifted_moves_each_image_by_at_most_one_pixel_every_way():
    x = np.zeros((900, 64), np.float32)
    x[:, 3 * 8 + 4] = 1.0  # one lit pixel, away from the border
    out = shifted(tf.constant(x), (8, 8), tf.constant([5, 7], tf.int64)).numpy()
    lit = out.argmax(axis=1)
    moves = {(int(p // 8) - 3, int(p % 8) - 4) for p in lit}
    assert moves == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}  # all nine, nothing farther
    np.testing.assert_array_equal(out.sum(axis=1), 1.0)  # moved, not blurred
    corner = np.zeros((200, 64), np.float32)
    corner[:, 0] = 1.0
    assert 0 < shifted(tf.constant(corner), (8, 8), tf.constant([5, 7], tf.int64)).numpy().sum() < 200  # zero fill


def test_shift_augmented_training_learns_digits_and_refuses_tabular_rows():
    from training.data import Dataset, digits
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    settings = TrainConfig(epochs=10, mc_samples=5, shift_augment=True)
    trained = train(digits(), ModelConfig(hidden=(64, 32)), settings)
    plain = train(digits(), ModelConfig(hidden=(64, 32)), replace(settings, shift_augment=False))
    assert trained.metrics["test_deterministic"]["accuracy"] > 0.4  # shifted digits are still digits (chance: 0.1)
    assert not np.array_equal(trained.model.get_weights()[0], plain.model.get_weights()[0])  # the rows did move
    rows = np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32)
    table = Dataset("table", rows, np.arange(100) % 2, "classification", class_labels=["a", "b"])
    with pytest.raises(ValueError, match="needs one-channel image rows"):
        train(table, ModelConfig(hidden=(4,)), replace(settings, calibration_split=0.0, calibration_from_test=0.0))
