"""TensorFlow's stateless Philox stream, written in elementwise ops so that one call serves many seeds.

``tf.raw_ops.StatelessRandomUniformFullIntV2`` draws from one ``(key, counter)`` per call, so a
batched MC call that gives every request its own seed used to loop over the requests, one random
op per request and dropout layer; that loop cost as much as the forward passes themselves. The
functions here compute the same Philox-4x32-10 blocks (Salmon et al. 2011, as TensorFlow's
``philox_random.h`` does) for a whole vector of keys and counters at once: every request's words
in a few dozen vectorized ops, bit for bit the words the raw op gives each request on its own.
"""

from __future__ import annotations

import tensorflow as tf

_ROUNDS = 10
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_SEED_SCRAMBLE_KEY = 0x02461E29_3EC8F720  # TensorFlow's GenerateKey: a Philox block of the seed gives key and counter
_LOW = 0xFFFFFFFF


def _halves(words: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The low and high 32 bits of uint64 ``words``, as uint32."""
    low = tf.cast(tf.bitwise.bitwise_and(words, tf.constant(_LOW, tf.uint64)), tf.uint32)
    return low, tf.cast(tf.bitwise.right_shift(words, tf.constant(32, tf.uint64)), tf.uint32)


def _join(low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """uint64 from uint32 halves."""
    shifted = tf.bitwise.left_shift(tf.cast(high, tf.uint64), tf.constant(32, tf.uint64))
    return tf.bitwise.bitwise_or(shifted, tf.cast(low, tf.uint64))


def blocks(key: tf.Tensor, counter_low: tf.Tensor, counter_high: tf.Tensor) -> tf.Tensor:
    """The Philox block of each ``(key, counter)``: uint64 ``[n]`` each in, uint32 ``[n, 4]`` out.

    The state is kept as two ``[2, n]`` halves, ``(c0, c2)`` and ``(c1, c3)``, so one op does a round's two
    multiplications and the rest of the round takes a handful more: each op costs the executor a few
    microseconds whatever its size, and a batched call runs two such streams per dropout layer.
    """
    key, low, high = _halves(key), _halves(counter_low), _halves(counter_high)
    multiplied, mixed = tf.stack([low[0], high[0]]), tf.stack([low[1], high[1]])  # (c0, c2), (c1, c3)
    key = tf.stack(key)
    multipliers = tf.constant([[_MULTIPLIERS[0]], [_MULTIPLIERS[1]]], tf.uint64)
    key_steps = tf.constant([[_KEY_STEPS[0]], [_KEY_STEPS[1]]], tf.uint32)
    for round_ in range(_ROUNDS):
        product = tf.cast(multiplied, tf.uint64) * multipliers
        product_low = tf.cast(product, tf.uint32)  # the low 32 bits: unsigned casts wrap
        product_high = tf.cast(tf.bitwise.right_shift(product, tf.constant(32, tf.uint64)), tf.uint32)
        xor = tf.bitwise.bitwise_xor
        multiplied, mixed = xor(xor(tf.reverse(product_high, [0]), mixed), key), tf.reverse(product_low, [0])
        if round_ < _ROUNDS - 1:
            key = key + key_steps
    return tf.stack([multiplied[0], mixed[0], multiplied[1], mixed[1]], axis=1)


def key_counter(seeds: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``StatelessRandomGetKeyCounter`` for each row of int64 ``seeds [n, 2]``: uint64 key ``[n]`` and the
    counter's high word ``[n]`` (its low word is always 0)."""
    seeds = tf.bitcast(tf.cast(seeds, tf.int64), tf.uint64)
    mix = blocks(tf.fill(tf.shape(seeds)[:1], tf.constant(_SEED_SCRAMBLE_KEY, tf.uint64)), seeds[:, 0], seeds[:, 1])
    return _join(mix[:, 0], mix[:, 1]), _join(mix[:, 2], mix[:, 3])


def words(key: tf.Tensor, counter_high: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """int32 words ``[4 n]``: block ``start[i]`` of the stream ``(key[i], counter_high[i])`` for each ``i``, in
    order; the words ``StatelessRandomUniformFullIntV2`` returns from position ``4 start[i]`` of that stream.

    ``start`` is uint64 ``[n]``: the counter's low word starts at 0, so block ``start`` has it at ``start`` (no carry
    below 2**64 blocks).
    """
    return tf.reshape(tf.bitcast(blocks(key, start, counter_high), tf.int32), [-1])


def uniform(words: tf.Tensor) -> tf.Tensor:
    """float32 in [0, 1) from int32 ``words``, as ``StatelessRandomUniformV2`` makes them: 23 random mantissa bits
    under the exponent of 1, minus 1."""
    mantissa = tf.bitwise.bitwise_and(words, tf.constant(0x7FFFFF, tf.int32))
    return tf.bitcast(tf.bitwise.bitwise_or(mantissa, tf.constant(0x3F800000, tf.int32)), tf.float32) - 1.0
