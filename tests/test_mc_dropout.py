"""The exported signatures: inference equals Keras, MC dropout is seeded, stateless and dropout-only."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import export_model
from training.export import write_saved_model
from training.mc_dropout import sample


def mc(loaded, x: np.ndarray, samples: int, seed: int) -> np.ndarray:
    outputs = loaded.signatures["mc_dropout"](
        inputs=tf.constant(x, tf.float32), samples=tf.constant(samples), seed=tf.constant(seed, tf.int64)
    )
    return outputs["outputs"].numpy()


def serve(loaded, x: np.ndarray) -> np.ndarray:
    return loaded.signatures["serving_default"](inputs=tf.constant(x, tf.float32))["outputs"].numpy()


def digits_with_batchnorm(rate: float = 0.5) -> keras.Model:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((64,))
    x = keras.layers.Rescaling(1 / 16)(inputs)
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(rate)(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


@pytest.fixture(scope="module")
def batchnorm_dir(tmp_path_factory):
    from training.data import digits

    data = digits()
    model = digits_with_batchnorm()
    model.fit(data.x, data.y, epochs=2, batch_size=64, verbose=0)
    return export_model(model, tmp_path_factory.mktemp("bn"), "bn", task="classification")


def test_both_signatures_and_inference_equals_keras(tiny_classifier, tiny_classifier_dir, digit_rows):
    loaded = tf.saved_model.load(str(tiny_classifier_dir))
    assert set(loaded.signatures) == {"serving_default", "mc_dropout", "mc_dropout_segments"}
    expected = tiny_classifier.model(digit_rows, training=False).numpy()
    np.testing.assert_array_equal(serve(loaded, digit_rows), expected)


def test_mc_dropout_changes_no_variable_and_leaves_inference_alone(batchnorm_dir, digit_rows):
    loaded = tf.saved_model.load(str(batchnorm_dir))
    variables = {id(v): v for s in loaded.signatures.values() for v in s.variables}.values()
    assert any("moving_mean" in v.name for v in variables)
    before = [v.numpy().copy() for v in variables]
    inference_before = serve(loaded, digit_rows)
    for seed in range(100):
        mc(loaded, digit_rows, 10, seed)
    for old, variable in zip(before, variables, strict=True):
        np.testing.assert_array_equal(old, variable.numpy(), err_msg=variable.name)
    np.testing.assert_array_equal(inference_before, serve(loaded, digit_rows))


def test_batchnorm_runs_in_inference_mode_while_dropout_samples(digit_rows):
    """With dropout rate 0, MC samples must equal inference exactly: BN uses moving statistics."""
    model = digits_with_batchnorm(rate=0.0)
    model.fit(digit_rows, np.arange(16) % 10, epochs=1, verbose=0)
    samples = sample(model, digit_rows, 3, seed=0)
    np.testing.assert_allclose(samples, np.broadcast_to(model(digit_rows, training=False), samples.shape), atol=1e-6)


SCRIPT = """
import hashlib, sys, numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
seed = tf.constant(1234, tf.int64)
out = loaded.signatures["mc_dropout"](inputs=tf.constant(x), samples=tf.constant(50), seed=seed)
print(hashlib.sha256(out["outputs"].numpy().tobytes()).hexdigest())
"""


def test_seeded_samples_are_identical_across_processes(tiny_classifier_dir, digit_rows, tmp_path):
    np.save(tmp_path / "x.npy", digit_rows)
    digests = {
        subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tiny_classifier_dir), str(tmp_path / "x.npy")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    }
    in_process = hashlib.sha256(mc(tf.saved_model.load(str(tiny_classifier_dir)), digit_rows, 50, 1234).tobytes())
    assert digests == {in_process.hexdigest()}


def test_seeds_and_samples_differ(tiny_classifier_dir, digit_rows):
    loaded = tf.saved_model.load(str(tiny_classifier_dir))
    first, again, other = (
        mc(loaded, digit_rows, 30, 7),
        mc(loaded, digit_rows, 30, 7),
        mc(loaded, digit_rows, 30, 8),
    )
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    distinct = {first[t].tobytes() for t in range(30)}
    assert len(distinct) == 30


def test_mc_mean_approaches_inference_as_rate_goes_to_zero(tiny_classifier, digit_rows):
    from training.model import ModelConfig, build_network, with_preprocessing

    trained = tiny_classifier.model.layers[-1]
    gaps = []
    for rate in (0.5, 0.2, 0.05, 0.01, 0.0):
        network = build_network(ModelConfig(hidden=(32, 16), dropout=rate), (64,), 10, "classification")
        network.set_weights(trained.get_weights())
        model = with_preprocessing(network, np.zeros(1), np.full(1, 16.0))
        reference = model(digit_rows, training=False).numpy()
        gaps.append(np.abs(sample(model, digit_rows, 200, seed=3).mean(axis=0) - reference).max())
    assert all(a > b for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < 1e-6


def test_chunking_and_batch_mates_do_not_change_an_instance_samples(tiny_classifier, digit_rows):
    model = tiny_classifier.model
    whole = sample(model, digit_rows, 40, seed=5, rows_per_pass=1 << 20)
    chunked = sample(model, digit_rows, 40, seed=5, rows_per_pass=37)  # 2 samples per pass
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)
    alone = sample(model, digit_rows[3:4], 40, seed=5)
    np.testing.assert_allclose(alone[:, 0], whole[:, 3], rtol=0, atol=1e-6)
    prefix = sample(model, digit_rows, 10, seed=5)
    np.testing.assert_allclose(prefix, whole[:10], rtol=0, atol=1e-6)


def identity_model(layer: keras.layers.Layer, shape: tuple[int, ...]) -> keras.Model:
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


def test_dropout_drops_units_and_scales_the_kept_ones_by_one_over_keep():
    x = np.full((2, 500), 3.0, np.float32)
    samples = sample(identity_model(keras.layers.Dropout(0.3), (500,)), x, 20, seed=11)
    np.testing.assert_allclose(np.unique(samples), [0.0, 3.0 / 0.7], rtol=1e-6)
    assert 0.67 < np.mean(samples > 0) < 0.73
    np.testing.assert_array_equal(samples[:, 0], samples[:, 1])  # one network draw per sample


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.25, 0.375, 0.1])
def test_dyadic_and_other_rates_keep_units_at_one_minus_rate(rate):
    """Dyadic rates read bit fields of the random words, others a float a unit: the same Bernoulli either way."""
    x = np.full((1, 600), 2.0, np.float32)
    samples = sample(identity_model(keras.layers.Dropout(rate), (600,)), x, 200, seed=5)
    np.testing.assert_allclose(np.unique(samples), [0.0, 2.0 / (1 - rate)], rtol=1e-6)
    kept = np.mean(samples > 0)
    assert abs(kept - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / samples.size), kept
    per_unit = (samples[:, 0] > 0).mean(axis=0)  # every unit, not only some bit positions, is kept at 1 - rate
    assert per_unit.min() > 1 - rate - 0.2 and per_unit.max() < 1 - rate + 0.2, (per_unit.min(), per_unit.max())


def test_spatial_dropout_drops_whole_feature_maps():
    x = np.ones((1, 4, 4, 16), np.float32)
    samples = sample(identity_model(keras.layers.SpatialDropout2D(0.5), (4, 4, 16)), x, 10, seed=2)
    per_channel = samples[:, 0].reshape(10, 16, 16)
    assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))  # a channel is all kept or all dropped
    assert 0 < np.mean(samples == 0) < 1


def test_alpha_dropout_follows_keras_formula():
    """Dropped units take SELU's saturation value, then the affine correction a·x + b applies."""
    rate, alpha_p = 0.2, -1.6732632423543772 * 1.0507009873554805
    a = ((1 - rate) * (1 + rate * alpha_p**2)) ** -0.5
    b = -a * alpha_p * rate
    samples = sample(identity_model(keras.layers.AlphaDropout(rate), (400,)), np.full((1, 400), 2.0, np.float32), 5, 4)
    np.testing.assert_allclose(np.unique(samples), sorted([a * alpha_p + b, a * 2.0 + b]), rtol=1e-5)
    assert 0.75 < np.mean(np.isclose(samples, a * 2.0 + b)) < 0.85


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda p: keras.layers.Dropout(p), (12,)),
        (lambda p: keras.layers.Dropout(p, noise_shape=(None, 1, 8)), (4, 6)),
        (lambda p: keras.layers.SpatialDropout1D(p), (5, 6)),
        (lambda p: keras.layers.SpatialDropout2D(p), (4, 4, 3)),
        (lambda p: keras.layers.SpatialDropout2D(p, data_format="channels_first"), (3, 4, 4)),
        (lambda p: keras.layers.SpatialDropout3D(p), (2, 3, 3, 2)),
        (lambda p: keras.layers.GaussianDropout(p), (12,)),
    ],
)
def test_every_dropout_family_layer_samples_around_inference(make, shape):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    x = make(0.3)(keras.layers.Dense(8, activation="selu")(inputs))
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
    samples = sample(model, x, 4000, seed=9)
    reference = model(x, training=False).numpy()
    spread = samples.std(axis=0).max()
    assert spread > 0.01
    np.testing.assert_allclose(samples.mean(axis=0), reference, atol=6 * spread / np.sqrt(4000))


def test_export_model_on_a_user_functional_conv_model(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.SpatialDropout2D(0.3)(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Dropout(0.2)(x))
    model = keras.Model(inputs, outputs)
    path = export_model(model, tmp_path, "user-conv", task="classification", class_labels=["a", "b", "c"])
    loaded = tf.saved_model.load(str(path))
    x = np.random.default_rng(1).random((5, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(serve(loaded, x), model(x, training=False).numpy(), atol=1e-6)
    samples = mc(loaded, x, 25, 1)
    assert samples.shape == (25, 5, 3)
    np.testing.assert_allclose(samples.sum(axis=-1), 1.0, atol=1e-5)
    assert not np.allclose(samples[0], samples[1])


def test_a_model_without_dropout_gets_no_mc_signature(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    write_saved_model(model, tmp_path / "plain")
    assert set(tf.saved_model.load(str(tmp_path / "plain")).signatures) == {"serving_default"}


def nested_classic() -> keras.Model:
    network = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    inputs = keras.Input((12,))
    return keras.Model(inputs, network(keras.layers.Rescaling(0.5, offset=-1.0)(inputs)))


def skip_around_dropout() -> keras.Model:
    """The first dropout's input also feeds a layer after it, so those layers still need it per sample."""
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    dropped = keras.layers.Dropout(0.25)(hidden)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Concatenate()([dropped, hidden])))


def dropout_on_inputs() -> keras.Model:
    inputs = keras.Input((12,))
    x = keras.layers.Dense(16, activation="relu")(keras.layers.Dropout(0.2)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GaussianDropout(0.3)(x)))


@pytest.mark.parametrize("build", [nested_classic, skip_around_dropout, dropout_on_inputs])
def test_layers_before_the_first_dropout_run_once_and_change_no_bit(build, monkeypatch):
    """What every sample shares is computed once per row (``_shared_prefix``); computing it per sample, as the
    graph would without it, gives the same bits, alone and as segments of other requests."""
    from training import mc_dropout

    keras.utils.set_random_seed(3)
    model = build()
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    segments = dict(segments=np.array([0, 0, 1, 2, 2]), seeds=np.array([4, 9, 2]), first=np.zeros(3), samples=[7, 3, 5])
    once = sample(model, x, 30, seed=4), mc_dropout.sample_segments(model, x, **segments)
    monkeypatch.setattr(mc_dropout, "_shared_prefix", lambda *args: None)
    per_sample = sample(model, x, 30, seed=4), mc_dropout.sample_segments(model, x, **segments)
    assert once[0].std(axis=0).min() > 0  # real samples, not one repeated answer
    for fast, plain in zip(once, per_sample, strict=True):
        np.testing.assert_array_equal(fast, plain)
