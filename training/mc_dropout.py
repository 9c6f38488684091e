"""Monte-Carlo dropout as one graph call: dropout on, everything else in inference mode.

Calling a Keras model with ``training=True`` is the usual MC-dropout recipe and it is wrong
twice: it also runs BatchNormalization (and anything else that checks ``training``) in training
mode, updating its moving statistics, and Keras' dropout draws its masks from a seed state that
is saved inside the SavedModel, so every fresh process replays the same "random" masks.

Here the model is called with ``training=False`` while each dropout-family layer is temporarily
given a stochastic ``call`` that draws its noise from a *stateless* generator keyed by
``(seed, layer index)``. Nothing reads or writes a variable, so no variable can change, and the
same ``(inputs, samples, seed)`` gives bit-identical samples in any process.

One MC sample is one draw of the network: sample ``t`` uses one mask per dropout layer, shared by
every instance in the batch, and taken from the generator's stream at a position that depends
only on ``t``. So an instance's samples do not depend on which other instances share the
request, and running the samples in chunks (to bound memory) gives the same draws as running
them all at once.

``mc_dropout_segments_fn`` runs several such calls as one: each segment of the batch (one
client request) has its own seed and its own stretch of samples, and gets exactly the draws a
``mc_dropout`` call of its own would give it. That is what lets a server batch concurrent MC
requests without changing any request's answer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from training.concrete import ConcreteDropout

DROPOUT_LAYERS = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout, ConcreteDropout)
"""Layer types switched on for MC sampling (SpatialDropout1D/2D/3D subclass ``Dropout``; ``ConcreteDropout``
samples hard masks at its learned rate)."""

_ROW_PACKET = 16
"""Every forward pass has a multiple of this many rows, so that a row's outputs are the same bits
wherever it sits in the pass. CPU kernels compute elementwise functions (exp in softplus or sigmoid,
tanh, ...) in vector packets of up to 16 float32 (AVX-512) and finish a ragged tail with scalar code
that rounds differently, and a single-row matrix product takes its own path; whole packets of rows
avoid both, so a request's samples do not depend on who shares its call."""
_PHILOX = tf.random.Algorithm.PHILOX.value
_WORDS_PER_PHILOX_BLOCK = 4  # one Philox counter step yields four 32-bit words (four float32 numbers)
_SELU_ALPHA_P = -1.6732632423543772 * 1.0507009873554805  # AlphaDropout's dropped value


def dropout_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """All dropout-family layers of ``model``, nested models included, each once, in call order."""
    found: dict[int, keras.layers.Layer] = {}

    def walk(container: keras.Model) -> None:
        for layer in container.layers:
            if isinstance(layer, DROPOUT_LAYERS):
                found.setdefault(id(layer), layer)
            elif hasattr(layer, "layers"):
                walk(layer)

    walk(model)
    return list(found.values())


@dataclass
class _Draw:
    """The random stream of one forward pass: samples ``first .. first + count - 1``."""

    seed: tf.Tensor
    first: tf.Tensor
    count: tf.Tensor

    def noise(self, stream: int, per_sample_shape: tf.Tensor, bits: int | None) -> tf.Tensor:
        """The noise of one layer, ``[count, *per_sample_shape]`` (``_noise_from``).

        Sample ``t`` reads its own fixed stretch of the Philox stream keyed by
        ``(seed, stream)``, so a sample's noise does not depend on how samples are chunked.
        """
        key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(
            seed=tf.stack([self.seed, tf.constant(stream, tf.int64)])
        )
        blocks = _blocks(per_sample_shape, bits)
        offset = tf.cast(tf.stack([self.first * blocks, tf.constant(0, tf.int64)]), tf.uint64)
        length = tf.stack([self.count * blocks * _WORDS_PER_PHILOX_BLOCK])
        return _noise_from(_philox(length, key, counter + offset, bits), per_sample_shape, bits)


def _bits(layer: keras.layers.Layer) -> int | None:
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


def _noise_from(flat: tf.Tensor, per_sample_shape: tf.Tensor, bits: int | None) -> tf.Tensor:
    """Samples' noise ``[samples, *per_sample_shape]`` from their Philox stretches, one after another in
    ``flat``: uniform [0, 1) floats, or each unit's ``bits``-bit field of the words, low bits first."""
    size = tf.reduce_prod(per_sample_shape)
    if bits is not None:
        shifts = tf.range(0, 32, bits, dtype=tf.int32)
        flat = tf.bitwise.bitwise_and(tf.bitwise.right_shift(flat[:, tf.newaxis], shifts), 2**bits - 1)
    units = _blocks(per_sample_shape, bits) * _units_per_block(bits)
    per_sample = tf.reshape(flat, tf.stack([-1, units]))[:, :size]
    return tf.reshape(per_sample, tf.concat([[-1], per_sample_shape], 0))


def _noise_shape(layer: keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
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


def _normal_quantile(u: tf.Tensor) -> tf.Tensor:
    """``ndtri(u + 2**-25)`` (``u + 2**-25`` lies in (0, 1): finite quantiles), the same bits wherever
    ``u`` sits in its tensor.

    CPU kernels compute ``ndtri`` in vector packets and finish a ragged tail with scalar code that
    rounds differently; padding the last axis to a multiple of 16 keeps every value in the packets,
    so a sample's noise does not depend on how many samples or segments share the call.
    """
    width = tf.shape(u)[-1]
    pad = tf.concat([tf.zeros([tf.rank(u) - 1, 2], tf.int32), [[0, -width % 16]]], 0)
    return tf.math.ndtri(tf.pad(u, pad) + 2.0**-25)[..., :width]


def _apply_noise(layer: keras.layers.Layer, x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Keras' training-mode formula for ``layer``, with ``u`` as its noise: uniform [0, 1), or ``_bits``-bit
    fields."""
    bits = _bits(layer)
    if bits is not None:
        kept = tf.cast(u >= int(layer.rate * 2**bits), x.dtype)
        return _dropped(layer, x, kept)
    if isinstance(layer, ConcreteDropout):  # hard Bernoulli masks at the learned rate, read from its variable
        rate = tf.cast(layer.probability(), x.dtype)
        return x * tf.cast(u >= rate, x.dtype) / (1.0 - rate)
    rate = layer.rate
    if isinstance(layer, keras.layers.GaussianDropout):
        return x * tf.cast(1.0 + math.sqrt(rate / (1.0 - rate)) * _normal_quantile(u), x.dtype)
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


def _stochastic_call(layer: keras.layers.Layer, stream: int, draw: _Draw):
    def call(inputs, *args, **kwargs):
        # inputs holds draw.count copies of the batch, sample-major: [count * n, ...].
        shape = tf.shape(inputs, out_type=tf.int64)
        per_sample = tf.reshape(inputs, tf.concat([[draw.count, shape[0] // draw.count], shape[1:]], 0))
        noise = tf.expand_dims(draw.noise(stream, _noise_shape(layer, inputs), _bits(layer)), 1)
        return tf.reshape(_apply_noise(layer, per_sample, noise), shape)

    return call


@dataclass
class _SegmentDraws:
    """The random streams of one forward pass over several segments, each with its own seed.

    Segment ``r`` takes ``counts[r]`` samples from ``first[r]`` on, as ``_Draw(seeds[r], first[r], counts[r])``
    would; row ``p`` of the pass gets the noise of sample ``slot[p]`` of all those samples, in segment order.
    """

    seeds: tf.Tensor  # [R] int64
    first: tf.Tensor  # [R] int64: each segment's first sample in this pass
    counts: tf.Tensor  # [R] int64: each segment's samples in this pass
    slot: tf.Tensor  # [rows] int64

    def noise(self, stream: int, per_sample_shape: tf.Tensor, bits: int | None) -> tf.Tensor:
        """Noise ``[rows, *per_sample_shape]``: one Philox call per segment, then a gather.

        Each call reads the stretch of the stream ``_Draw.noise`` reads; the loop body is kept to
        the calls themselves (it runs once per segment and layer).
        """
        blocks = _blocks(per_sample_shape, bits)
        offsets = tf.cast(tf.stack([self.first * blocks, tf.zeros_like(self.first)], axis=1), tf.uint64)
        lengths = tf.reshape(self.counts * blocks * _WORDS_PER_PHILOX_BLOCK, [-1, 1])
        stream = tf.constant(stream, tf.int64)

        def one_segment(r: tf.Tensor, noise: tf.TensorArray):
            key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.stack([self.seeds[r], stream]))
            return r + 1, noise.write(r, _philox(lengths[r], key, counter + offsets[r], bits))

        segments = tf.shape(self.seeds)[0]
        noise = tf.TensorArray(tf.float32 if bits is None else tf.int32, size=segments, infer_shape=False)
        _, noise = tf.while_loop(lambda r, _: r < segments, one_segment, (tf.constant(0), noise))
        return tf.gather(_noise_from(noise.concat(), per_sample_shape, bits), self.slot)


def _segment_call(layer: keras.layers.Layer, stream: int, draws: _SegmentDraws):
    def call(inputs, *args, **kwargs):
        noisy = _apply_noise(layer, inputs, draws.noise(stream, _noise_shape(layer, inputs), _bits(layer)))
        return tf.ensure_shape(noisy, inputs.shape)  # the gathered noise has no static shape

    return call


@contextlib.contextmanager
def _dropout_switched_on(layers: list[keras.layers.Layer], draw: _Draw | _SegmentDraws) -> Iterator[None]:
    """Give each dropout layer a stochastic ``call`` while the forward pass is traced."""
    stochastic = _segment_call if isinstance(draw, _SegmentDraws) else _stochastic_call
    for stream, layer in enumerate(layers):
        layer.call = stochastic(layer, stream, draw)
    try:
        yield
    finally:
        for layer in layers:
            del layer.call


def _in_passes(model: keras.Model, rows_per_pass: int, batch: tf.Tensor, total: tf.Tensor, run: Callable) -> tf.Tensor:
    """``run(start, count)`` for consecutive stretches of ``total >= 1`` samples, concatenated: ``[total, batch, ...]``.

    Each pass holds at most ``rows_per_pass`` rows (at least one sample), so memory stays bounded for any T.
    """
    per_pass = tf.maximum(tf.constant(rows_per_pass, tf.int64) // tf.maximum(batch, 1), 1)
    chunks = tf.TensorArray(model.compute_dtype, size=0, dynamic_size=True, infer_shape=False)

    def one_pass(start: tf.Tensor, chunks: tf.TensorArray):
        count = tf.minimum(per_pass, total - start)
        return start + count, chunks.write(tf.cast(start // per_pass, tf.int32), run(start, count))

    _, chunks = tf.while_loop(lambda start, _: start < total, one_pass, (tf.constant(0, tf.int64), chunks))
    return tf.ensure_shape(chunks.concat(), [None, None, *model.outputs[0].shape[1:]])


def _one_seed(model: keras.Model, layers: list, inputs: tf.Tensor, seed: tf.Tensor, first: tf.Tensor):
    """``run(start, count)`` for ``_in_passes``: samples ``first + start ..`` of every row with one seed,
    the batch tiled sample-major."""

    def run(start: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(inputs, out_type=tf.int64)
        # A few samples more (dropped below) make the pass's rows whole vector packets (see _ROW_PACKET).
        packets = _ROW_PACKET // tf.maximum(tf.minimum(tf.bitwise.bitwise_and(shape[0], -shape[0]), _ROW_PACKET), 1)
        drawn = count + (-count) % packets
        tiled = tf.tile(inputs[tf.newaxis], tf.concat([[drawn], tf.ones_like(shape)], 0))
        rows = tf.reshape(tiled, tf.concat([[-1], shape[1:]], 0))
        with _dropout_switched_on(layers, _Draw(seed, first + start, drawn)):
            outputs = model(rows, training=False)
        return tf.reshape(outputs, tf.concat([[drawn, shape[0]], tf.shape(outputs, out_type=tf.int64)[1:]], 0))[:count]

    return run


def mc_dropout_fn(model: keras.Model, rows_per_pass: int):
    """A graph function ``(inputs, samples, seed) -> outputs [samples, batch, ...]``.

    All samples run in one call: the batch is tiled and pushed through the network once per
    chunk of samples, each chunk holding at most ``rows_per_pass`` rows (at least one sample),
    so memory stays bounded for any ``samples``. Trace it with an input signature.
    """
    layers = dropout_layers(model)

    def mc_dropout(inputs: tf.Tensor, samples: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        samples = tf.cast(samples, tf.int64)
        with tf.control_dependencies([tf.debugging.assert_positive(samples, message="samples must be at least 1")]):
            batch = tf.shape(inputs, out_type=tf.int64)[0]
        run = _one_seed(model, layers, inputs, tf.cast(seed, tf.int64), tf.constant(0, tf.int64))
        return _in_passes(model, rows_per_pass, batch, samples, run)

    return mc_dropout


def mc_dropout_segments_fn(model: keras.Model, rows_per_pass: int):
    """A graph function ``(inputs, segments, seeds, first, samples) -> outputs [T, N, ...]``.

    Row ``i`` of ``inputs`` belongs to segment ``segments[i]``; segment ``r`` asks for samples
    ``first[r] .. first[r] + samples[r] - 1`` drawn with ``seeds[r]``. ``outputs[k, i]`` is sample
    ``first[r] + k`` of row ``i`` for ``k < samples[r]`` and 0 beyond (T is the largest ``samples``
    of a segment with rows). A segment's samples equal, bit for bit, what ``mc_dropout_fn`` gives
    its rows alone with its seed: the same masks (one per sample, shared by the segment's rows),
    from the same stretch of the stream, and the network computes each row on its own. A call
    with one segment runs exactly as ``mc_dropout_fn`` does (the batch tiled, no gathers).
    """
    layers = dropout_layers(model)

    def mc_dropout_segments(
        inputs: tf.Tensor, segments: tf.Tensor, seeds: tf.Tensor, first: tf.Tensor, samples: tf.Tensor
    ) -> tf.Tensor:
        segments, seeds = tf.cast(segments, tf.int64), tf.cast(seeds, tf.int64)
        first, samples = tf.cast(first, tf.int64), tf.cast(samples, tf.int64)
        count_segments = tf.shape(seeds, out_type=tf.int64)[0]
        # Out-of-range segments and ragged first / samples fail in the gathers below with TensorFlow's own message.
        checks = [
            tf.debugging.assert_non_negative(tf.concat([first, samples], 0), message="first and samples must be >= 0"),
            tf.debugging.assert_equal(tf.size(segments), tf.shape(inputs)[0], message="one segment per row"),
        ]
        with tf.control_dependencies(checks):
            row_samples = tf.gather(samples, segments)  # [N]
        batch = tf.shape(inputs, out_type=tf.int64)[0]
        total = tf.reduce_max(row_samples)
        with tf.control_dependencies([tf.debugging.assert_positive(total, message="no row asks for a sample")]):
            total = tf.identity(total)

        def run(start: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
            wanted = (start + tf.range(count))[:, tf.newaxis] < row_samples[tf.newaxis, :]  # [count, N]
            pairs = tf.where(wanted)  # (sample in pass, row), sample-major
            counts = tf.clip_by_value(samples - start, 0, count)  # each segment's samples in this pass
            offsets = tf.cumsum(counts, exclusive=True)
            slot = tf.gather(offsets, tf.gather(segments, pairs[:, 1])) + pairs[:, 0]
            padding = tf.zeros([-tf.shape(pairs)[0] % _ROW_PACKET], tf.int64)  # whole vector packets: _ROW_PACKET
            draws = _SegmentDraws(seeds, first + start, counts, tf.concat([slot, padding], 0))
            with _dropout_switched_on(layers, draws):
                outputs = model(tf.gather(inputs, tf.concat([pairs[:, 1], padding], 0)), training=False)
            outputs = outputs[: tf.shape(pairs)[0]]
            return tf.scatter_nd(pairs, outputs, tf.concat([[count, batch], tf.shape(outputs, tf.int64)[1:]], 0))

        def one_segment() -> tf.Tensor:
            return _in_passes(model, rows_per_pass, batch, total, _one_seed(model, layers, inputs, seeds[0], first[0]))

        return tf.cond(count_segments == 1, one_segment, lambda: _in_passes(model, rows_per_pass, batch, total, run))

    return mc_dropout_segments


def sample(model: keras.Model, inputs: np.ndarray, samples: int, seed: int, rows_per_pass: int = 2**15) -> np.ndarray:
    """Run ``mc_dropout_fn`` on an in-memory model (what the exported signature computes)."""
    fn = tf.function(mc_dropout_fn(model, rows_per_pass), autograph=False)
    outputs = fn(tf.constant(inputs, tf.float32), tf.constant(samples, tf.int32), tf.constant(seed, tf.int64))
    return outputs.numpy()


def sample_segments(
    model: keras.Model,
    inputs: np.ndarray,
    segments: np.ndarray,
    seeds: np.ndarray,
    first: np.ndarray,
    samples: np.ndarray,
    rows_per_pass: int = 2**15,
) -> np.ndarray:
    """Run ``mc_dropout_segments_fn`` on an in-memory model (what the exported signature computes)."""
    fn = tf.function(mc_dropout_segments_fn(model, rows_per_pass), autograph=False)
    arguments = [(inputs, tf.float32), (segments, tf.int32), (seeds, tf.int64), (first, tf.int32), (samples, tf.int32)]
    return fn(*(tf.constant(value, dtype) for value, dtype in arguments)).numpy()
