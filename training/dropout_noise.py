"""Each dropout layer's noise in an MC forward pass: which random numbers it reads, and how they become masks.

A sample's noise for one layer is a fixed stretch of the stateless Philox stream keyed by
``(seed, layer index)``, at a position that depends only on the sample's index, so chunking the
samples or sharing the call with other requests changes no draw. ``Draw`` reads one seed's stretch
with TensorFlow's random op; ``SegmentDraws`` reads every segment's (each request its own seed) at
once with ``training.philox``, the same bits. Bernoulli layers with a dyadic rate read a few bits a
unit (``mask_bits``) and turn them into masks by a table lookup per byte (``_kept``); other layers read
uniform floats. ``apply_noise`` is Keras' training-mode formula of each layer with that noise.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import keras
import tensorflow as tf

from training import philox
from training.concrete import ConcreteDropout

_PHILOX = tf.random.Algorithm.PHILOX.value
_WORDS_PER_PHILOX_BLOCK = 4  # one Philox counter step yields four 32-bit words (four float32 numbers)
_SELU_ALPHA_P = -1.6732632423543772 * 1.0507009873554805  # AlphaDropout's dropped value


@dataclass
class Draw:
    """The random stream of one forward pass: samples ``first .. first + count - 1``."""

    seed: tf.Tensor
    first: tf.Tensor
    count: tf.Tensor

    def noise(self, stream: int, per_sample_shape: tf.Tensor, layer: keras.layers.Layer) -> tf.Tensor:
        """The noise of one layer, ``[count, *per_sample_shape]`` (``_noise``).

        Sample ``t`` reads its own fixed stretch of the Philox stream keyed by
        ``(seed, stream)``, so a sample's noise does not depend on how samples are chunked.
        """
        key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(
            seed=tf.stack([self.seed, tf.constant(stream, tf.int64)])
        )
        bits = mask_bits(layer)
        blocks = _blocks(per_sample_shape, bits)
        offset = tf.cast(tf.stack([self.first * blocks, tf.constant(0, tf.int64)]), tf.uint64)
        length = tf.stack([self.count * blocks * _WORDS_PER_PHILOX_BLOCK])
        stretches = _per_sample(_philox(length, key, counter + offset, bits), blocks)
        return _noise(stretches, per_sample_shape, layer)


def mask_bits(layer: keras.layers.Layer) -> int | None:
    """Bits per unit for a layer whose kept-or-dropped draw can read a few random bits: a Bernoulli
    dropout whose rate is ``m / 2**b`` with ``b <= 8`` (0.5 takes one bit, 0.25 two) keeps a unit when
    its ``b``-bit field is at least ``m``, with exactly probability ``1 - rate``; None: a float uniform.

    Philox costs ~5 ns per 32 random bits on this CPU, and a batched MC call draws every request's
    masks, so a 0.5 dropout drawing 1 bit a unit instead of a float costs 32x less random numbers.
    """
    if isinstance(layer, (keras.layers.GaussianDropout, ConcreteDropout)):  # quantiles; a learned rate
        return None
    for bits in (1, 2, 4, 8):
        if float(layer.rate * 2**bits).is_integer():
            return bits
    return None


def _units_per_block(bits: int | None) -> int:
    """Units one Philox block (four 32-bit words) gives noise to: one a word, or ``32 / bits`` a word."""
    return _WORDS_PER_PHILOX_BLOCK * (1 if bits is None else 32 // bits)


def _blocks(per_sample_shape: tf.Tensor, bits: int | None) -> tf.Tensor:
    """Philox blocks one sample's noise reads."""
    units = _units_per_block(bits)
    return (tf.reduce_prod(per_sample_shape) + units - 1) // units


def _philox(length: tf.Tensor, key: tf.Tensor, counter: tf.Tensor, bits: int | None) -> tf.Tensor:
    """``length`` numbers of the Philox stream from ``counter``: uniform floats, or raw 32-bit words."""
    if bits is None:
        kind = tf.raw_ops.StatelessRandomUniformV2
        return kind(shape=length, key=key, counter=counter, alg=_PHILOX, dtype=tf.float32)
    kind = tf.raw_ops.StatelessRandomUniformFullIntV2
    return kind(shape=length, key=key, counter=counter, alg=_PHILOX, dtype=tf.int32)


def _per_sample(flat: tf.Tensor, blocks: tf.Tensor) -> tf.Tensor:
    """Samples' Philox stretches, one after another in ``flat``, as rows ``[samples, 4 * blocks]``."""
    return tf.reshape(flat, tf.stack([-1, blocks * _WORDS_PER_PHILOX_BLOCK]))


def _noise(stretches: tf.Tensor, per_sample_shape: tf.Tensor, layer: keras.layers.Layer) -> tf.Tensor:
    """Noise ``[n, *per_sample_shape]`` from ``n`` Philox stretches (``_per_sample``): uniform [0, 1) floats, or
    for a layer with ``mask_bits`` its mask read from each unit's field: 0.0 dropped, and kept 1.0 or, for a layer
    with ``_exact_scale``, that scale."""
    bits = mask_bits(layer)
    size = tf.reduce_prod(per_sample_shape)
    if bits is not None:
        words = stretches[:, : (size * bits + 31) // 32]  # a stretch is whole Philox blocks: 128 units at 1 bit
        stretches = _kept(words, bits, int(layer.rate * 2**bits), _exact_scale(layer) or 1.0)
    return tf.reshape(stretches[:, :size], tf.concat([[-1], per_sample_shape], 0))


def _kept(words: tf.Tensor, bits: int, threshold: int, kept: float) -> tf.Tensor:
    """``[n, 32 / bits * width]`` masks from int32 words ``[n, width]``: the unit of each ``bits``-bit field, low bits
    first, is ``kept`` when its field is at least ``threshold``, else 0. One table lookup per byte of the words does
    in one pass what shifting out every field, comparing and converting it would do in four."""
    fields = range(0, 8, bits)
    table = tf.constant([[kept * ((byte >> at) & (2**bits - 1) >= threshold) for at in fields] for byte in range(256)])
    if sys.byteorder == "little":  # the words' bytes in memory are their low byte first
        octets = tf.cast(tf.bitcast(words, tf.uint8), tf.int32)
    else:
        octets = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words[..., tf.newaxis], [0, 8, 16, 24]), 255)
    return tf.reshape(tf.gather(table, octets), tf.stack([tf.shape(words)[0], -1]))


def _exact_scale(layer: keras.layers.Layer) -> float | None:
    """``1 / (1 - rate)`` for a Dropout whose ``1 - rate`` is a power of two (0.5 at rate 0.5): then ``x * scale`` has
    exactly the bits of Keras' ``x / (1 - rate)``, so the mask can carry the scale and save a pass over ``x``."""
    if isinstance(layer, keras.layers.AlphaDropout) or not 0.0 <= layer.rate < 1.0:
        return None
    scale = 1.0 / (1.0 - layer.rate)
    return scale if math.frexp(scale)[0] == 0.5 else None


def noise_shape(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """The shape of one sample's noise for ``layer``, batch axis excluded."""
    features = tf.shape(inputs, out_type=tf.int64)[1:]
    ones = tf.ones_like(features)
    if isinstance(layer, keras.layers.SpatialDropout1D):
        return tf.concat([ones[:-1], features[-1:]], 0)
    if isinstance(layer, (keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D)):
        if layer.data_format == "channels_first":
            return tf.concat([features[:1], ones[1:]], 0)
        return tf.concat([ones[:-1], features[-1:]], 0)
    declared = getattr(layer, "noise_shape", None)
    if declared is None:
        return features
    return tf.stack([features[i] if d is None else tf.constant(d, tf.int64) for i, d in enumerate(declared[1:])])


def normal_quantile(u: tf.Tensor) -> tf.Tensor:
    """``ndtri(u + 2**-25)`` (``u + 2**-25`` lies in (0, 1): finite quantiles), the same bits wherever
    ``u`` sits in its tensor.

    CPU kernels compute ``ndtri`` in vector packets and finish a ragged tail with scalar code that
    rounds differently; padding the last axis to a multiple of 16 keeps every value in the packets,
    so a sample's noise does not depend on how many samples or segments share the call.
    """
    width = tf.shape(u)[-1]
    pad = tf.concat([tf.zeros([tf.rank(u) - 1, 2], tf.int32), [[0, -width % 16]]], 0)
    return tf.math.ndtri(tf.pad(u, pad) + 2.0**-25)[..., :width]


def apply_noise(layer: keras.layers.Layer, x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Keras' training-mode formula for ``layer``, with ``u`` as its noise (``_noise``): uniform [0, 1), or the kept
    mask of a layer with ``mask_bits``."""
    if mask_bits(layer) is not None:
        mask = tf.cast(u, x.dtype)
        return x * mask if _exact_scale(layer) else _dropped(layer, x, mask)
    if isinstance(layer, ConcreteDropout):  # hard Bernoulli masks at the learned rate, read from its variable
        rate = tf.cast(layer.probability(), x.dtype)
        return x * tf.cast(u >= rate, x.dtype) / (1.0 - rate)
    rate = layer.rate
    if isinstance(layer, keras.layers.GaussianDropout):
        return x * tf.cast(1.0 + math.sqrt(rate / (1.0 - rate)) * normal_quantile(u), x.dtype)
    return _dropped(layer, x, tf.cast(u >= rate, x.dtype))


def _dropped(layer: keras.layers.Layer, x: tf.Tensor, kept: tf.Tensor) -> tf.Tensor:
    """Dropout's or AlphaDropout's formula, ``kept`` 1 for the units kept, 0 for those dropped."""
    rate = layer.rate
    if isinstance(layer, keras.layers.AlphaDropout):
        a = ((1 - rate) * (1 + rate * _SELU_ALPHA_P**2)) ** -0.5
        b = -a * _SELU_ALPHA_P * rate
        return a * (x * kept + _SELU_ALPHA_P * (1 - kept)) + b
    if rate >= 1.0:
        return tf.zeros_like(x)
    return x * kept / (1.0 - rate)


@dataclass
class SegmentDraws:
    """The random streams of one forward pass over several segments, each with its own seed.

    Segment ``r`` takes ``counts[r]`` samples from ``first[r]`` on, as ``Draw(seeds[r], first[r], counts[r])``
    would; row ``p`` of the pass gets the noise of sample ``slot[p]`` of all those samples, in segment order.
    """

    seeds: tf.Tensor  # [R] int64
    first: tf.Tensor  # [R] int64: each segment's first sample in this pass
    counts: tf.Tensor  # [R] int64: each segment's samples in this pass
    slot: tf.Tensor  # [rows] int64

    def noise(self, stream: int, per_sample_shape: tf.Tensor, layer: keras.layers.Layer) -> tf.Tensor:
        """Noise ``[rows, *per_sample_shape]``: every segment's stretch of its own stream at once, then a gather.

        Segment ``r`` reads the blocks ``Draw.noise`` reads with its seed; ``training.philox`` computes the
        blocks of all segments in one set of vectorized ops, bit for bit those of the raw random op.
        """
        bits = mask_bits(layer)
        blocks = _blocks(per_sample_shape, bits)
        key, counter = philox.key_counter(
            tf.stack([self.seeds, tf.fill(tf.shape(self.seeds), tf.constant(stream, tf.int64))], 1)
        )
        per_segment = self.counts * blocks
        segment = tf.repeat(tf.range(tf.size(per_segment)), per_segment)  # each block's segment
        within = tf.range(tf.reduce_sum(per_segment)) - tf.gather(tf.cumsum(per_segment, exclusive=True), segment)
        position = tf.cast(tf.gather(self.first * blocks, segment) + within, tf.uint64)
        words = philox.words(tf.gather(key, segment), tf.gather(counter, segment), position)
        stretches = _per_sample(words if bits is not None else philox.uniform(words), blocks)
        return _noise(tf.gather(stretches, self.slot), per_sample_shape, layer)
