"""``training.philox`` is TensorFlow's stateless Philox stream, bit for bit, for many seeds at once."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from training import philox

SEEDS = [[7, 1], [-3, 0], [2**62 + 5, -(2**40)], [0, 0], [123456789, 2]]


def raw_stream(seed: list[int], block: int, blocks: int, kind) -> np.ndarray:
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.constant(seed, tf.int64))
    start = counter + tf.constant([block, 0], tf.uint64)
    dtype = tf.int32 if kind is tf.raw_ops.StatelessRandomUniformFullIntV2 else tf.float32
    return kind(shape=[4 * blocks], key=key, counter=start, alg=1, dtype=dtype).numpy()


def test_keys_and_counters_are_the_raw_ops():
    key, high = philox.key_counter(tf.constant(SEEDS, tf.int64))
    for i, seed in enumerate(SEEDS):
        raw_key, raw_counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.constant(seed, tf.int64))
        assert raw_counter.numpy()[0] == 0  # what words() relies on
        assert (raw_key.numpy()[0], raw_counter.numpy()[1]) == (key.numpy()[i], high.numpy()[i])


@pytest.mark.parametrize("block", [0, 3, 2**32 - 2, 2**40 + 7])
def test_every_seed_gets_its_own_stretch_of_its_stream(block):
    """Blocks of several streams interleaved in one call equal each stream's raw words and floats."""
    key, high = philox.key_counter(tf.constant(SEEDS, tf.int64))
    blocks = 3
    which = np.repeat(np.arange(len(SEEDS)), blocks)
    position = np.tile(np.arange(block, block + blocks, dtype=np.uint64), len(SEEDS))
    words = philox.words(tf.gather(key, which), tf.gather(high, which), tf.constant(position, tf.uint64)).numpy()
    uniform = philox.uniform(tf.constant(words)).numpy()
    for i, seed in enumerate(SEEDS):
        mine = slice(4 * blocks * i, 4 * blocks * (i + 1))
        np.testing.assert_array_equal(
            words[mine], raw_stream(seed, block, blocks, tf.raw_ops.StatelessRandomUniformFullIntV2)
        )
        np.testing.assert_array_equal(
            uniform[mine], raw_stream(seed, block, blocks, tf.raw_ops.StatelessRandomUniformV2)
        )
    assert len(np.unique(words)) > 0.99 * len(words)  # different streams, not one repeated
