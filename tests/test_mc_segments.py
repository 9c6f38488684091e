"""mc_dropout_segments: several requests' MC draws in one call, each bit-identical to its own mc_dropout call."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import artifact, export_model, signatures
from training.concrete import ConcreteDropout
from training.mc_dropout import sample, sample_segments
from training.signatures import Segment

SIZES, SEEDS, FIRST, SAMPLES = [3, 1, 5, 2, 4], [11, 12, 13, 11, 2**40], [0, 5, 17, 3, 0], [20, 7, 40, 1, 0]


def mc(loaded, x: np.ndarray, samples: int, seed: int) -> dict[str, np.ndarray]:
    draws = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], x, samples, seed)
    return {"outputs": draws.outputs, "variance": draws.variance, "predictive": draws.predictive}


def shuffled_segments(rows: int) -> np.ndarray:
    """Row -> segment for SIZES, in a scrambled row order (the signature does not need segments contiguous)."""
    segments = np.repeat(np.arange(len(SIZES), dtype=np.int32), SIZES)
    assert len(segments) <= rows
    return np.random.default_rng(0).permutation(segments)


def assert_segments_equal_alone(got: np.ndarray, alone, segments: np.ndarray) -> None:
    """Every segment's samples equal ``alone(rows, samples, seed)`` bit for bit, and are zero beyond its T."""
    assert got.shape[0] == max(SAMPLES)
    for r, (seed, first, count) in enumerate(zip(SEEDS, FIRST, SAMPLES, strict=True)):
        rows = np.flatnonzero(segments == r)
        if count:
            np.testing.assert_array_equal(got[:count, rows], alone(rows, first + count, seed)[first:])
        assert not got[count:, rows].any()


@pytest.fixture(scope="module")
def tiny(tiny_classifier_dir):
    return tf.saved_model.load(str(tiny_classifier_dir))


def test_segments_signature_is_exported_beside_mc_dropout(tiny):
    assert set(tiny.signatures) == {"serving_default", "mc_dropout", "mc_dropout_segments"}
    inputs = tiny.signatures["mc_dropout_segments"].structured_input_signature[1]
    assert {k: (v.dtype, v.shape.as_list()) for k, v in inputs.items()} == {
        "inputs": (tf.float32, [None, 64]),
        "segments": (tf.int32, [None]),
        "seeds": (tf.int64, [None]),
        "first": (tf.int32, [None]),
        "samples": (tf.int32, [None]),
    }


def test_each_segment_gets_exactly_the_draws_of_mc_dropout_with_its_seed(tiny, digit_rows):
    segments = shuffled_segments(len(digit_rows))
    x = digit_rows[: len(segments)]
    got = tiny.signatures["mc_dropout_segments"](
        inputs=tf.constant(x, tf.float32),
        segments=tf.constant(segments),
        seeds=tf.constant(SEEDS, tf.int64),
        first=tf.constant(FIRST),
        samples=tf.constant(SAMPLES),
    )["outputs"].numpy()
    assert_segments_equal_alone(got, lambda rows, t, seed: mc(tiny, x[rows], t, seed)["outputs"], segments)


def test_client_splits_segments_and_stretches_join_into_one_call(tiny, digit_rows):
    call = tiny.signatures["mc_dropout_segments"]
    whole = mc(tiny, digit_rows[:4], 50, 5)["outputs"]
    other = Segment(digit_rows[4:9], 99, 3, 30)  # shares every call, with another seed and T
    parts = [
        signatures.segment_draws(call, [Segment(digit_rows[:4], 5, first, count), other])
        for first, count in [(0, 7), (7, 13), (20, 30)]
    ]
    assert all(p[0].outputs.flags.c_contiguous and p[0].variance is None for p in parts)
    np.testing.assert_array_equal(signatures.joined([p[0] for p in parts]).outputs, whole)
    alone = signatures.segment_draws(call, [Segment(digit_rows[:4], 5, 0, 50)])  # one segment: the tiled path
    np.testing.assert_array_equal(alone[0].outputs, whole)
    np.testing.assert_array_equal(parts[0][1].outputs, mc(tiny, digit_rows[4:9], 33, 99)["outputs"][3:])


def test_heteroscedastic_segments_return_the_same_means_and_variances(tmp_path):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dropout(0.3)(keras.layers.Dense(16, activation="relu")(inputs))
    mean = keras.layers.Dense(1)(hidden)
    variance = keras.layers.Dense(1, activation="softplus")(hidden)
    model = keras.Model(inputs, keras.layers.Concatenate()([mean, variance]))
    path = export_model(model, tmp_path, "hetero", task="regression", likelihood="heteroscedastic")
    loaded = tf.saved_model.load(str(path))
    x = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    segments = shuffled_segments(len(x))
    got = loaded.signatures["mc_dropout_segments"](
        inputs=tf.constant(x[: len(segments)]),
        segments=tf.constant(segments),
        seeds=tf.constant(SEEDS, tf.int64),
        first=tf.constant(FIRST),
        samples=tf.constant(SAMPLES),
    )
    for key in ("outputs", "variance"):
        assert_segments_equal_alone(
            got[key].numpy(), lambda rows, t, seed, key=key: mc(loaded, x[rows], t, seed)[key], segments
        )


def test_calibrated_predictive_is_computed_by_the_client_the_same_alone_as_batched(
    tiny_classifier, digit_rows, tmp_path
):
    model = tiny_classifier.model
    path = export_model(model, tmp_path, "calibrated", task="classification", predictive_temperature=0.7)
    loaded = tf.saved_model.load(str(path))
    assert "predictive" not in loaded.signatures["mc_dropout_segments"].structured_outputs
    call = loaded.signatures["mc_dropout_segments"]
    alone = signatures.segment_draws(call, [Segment(digit_rows[:3], 8, 0, 60)])[0]
    batched = signatures.segment_draws(call, [Segment(digit_rows[5:], 1, 0, 90), Segment(digit_rows[:3], 8, 0, 60)])[1]
    predictive = signatures.calibrated_predictive(alone.outputs, 0.7)
    assert predictive.tobytes() == signatures.calibrated_predictive(batched.outputs, 0.7).tobytes()
    in_graph = mc(loaded, digit_rows[:3], 60, 8)["predictive"]  # mc_dropout's own, in float32
    np.testing.assert_allclose(predictive, in_graph, rtol=0, atol=2e-6)
    assert not np.allclose(predictive, alone.outputs.mean(axis=0), atol=1e-3)  # the temperature did something


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: keras.layers.Dropout(0.3), (12,)),
        (lambda: keras.layers.Dropout(0.3, noise_shape=(None, 1, 8)), (4, 6)),
        (lambda: keras.layers.SpatialDropout1D(0.3), (5, 6)),
        (lambda: keras.layers.SpatialDropout2D(0.3), (4, 4, 3)),
        (lambda: keras.layers.GaussianDropout(0.3), (12,)),  # 8 noise values a sample: ndtri's ragged tail
        (lambda: keras.layers.AlphaDropout(0.3), (12,)),
        (lambda: ConcreteDropout(), (12,)),
        # Dyadic rates: masks from bit fields of the Philox words (training.dropout_noise.mask_bits)
        (lambda: keras.layers.Dropout(0.5), (40,)),  # 40 units: two words a sample, the second partly used
        (lambda: keras.layers.Dropout(0.5, noise_shape=(None, 1, 8)), (4, 6)),
        (lambda: keras.layers.SpatialDropout2D(0.25), (4, 4, 3)),
        (lambda: keras.layers.AlphaDropout(0.125), (12,)),
    ],
)
def test_every_dropout_family_layer_draws_the_same_bits_in_segments(make, shape):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    x = make()(keras.layers.Dense(8, activation="selu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    x = np.random.default_rng(0).normal(size=(15, *shape)).astype(np.float32)
    segments = shuffled_segments(len(x))
    x = x[: len(segments)]
    for rows_per_pass in (2**15, 23):  # one pass, and several passes of a few samples
        got = sample_segments(model, x, segments, np.array(SEEDS), np.array(FIRST), np.array(SAMPLES), rows_per_pass)
        assert_segments_equal_alone(got, lambda rows, t, seed: sample(model, x[rows], t, seed), segments)


def test_bad_segment_arguments_fail_with_a_message(tiny, digit_rows):
    call = tiny.signatures["mc_dropout_segments"]

    def run(segments, seeds, first, samples):
        return call(
            inputs=tf.constant(digit_rows[:2]),
            segments=tf.constant(segments, tf.int32),
            seeds=tf.constant(seeds, tf.int64),
            first=tf.constant(first, tf.int32),
            samples=tf.constant(samples, tf.int32),
        )

    assert run([0, 1], [1, 2], [0, 0], [3, 4])["outputs"].shape == (4, 2, 10)
    for arguments, message in [
        (([0, 2], [1, 2], [0, 0], [3, 4]), "not in"),  # a segment without a seed
        (([0, 0, 0], [1], [0], [3]), "one segment per row"),
        (([0, 0], [1], [-1], [3]), "first and samples must be >= 0"),
        (([0, 0], [1], [0], [0]), "no row asks for a sample"),
    ]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            run(*arguments)
