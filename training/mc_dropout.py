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

The layers called before the first dropout layer give every sample the same values, so they run
once per row (``_shared_prefix``) and the samples start from there; the noise itself comes from
``training.dropout_noise``.

``mc_dropout_segments_fn`` runs several such calls as one: each segment of the batch (one
client request) has its own seed and its own stretch of samples, and gets exactly the draws a
``mc_dropout`` call of its own would give it. That is what lets a server batch concurrent MC
requests without changing any request's answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from training.concrete import ConcreteDropout
from training.dropout_noise import Draw, SegmentDraws, apply_noise, noise_shape

DROPOUT_LAYERS = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout, ConcreteDropout)
"""Layer types switched on for MC sampling (SpatialDropout1D/2D/3D subclass ``Dropout``; ``ConcreteDropout``
samples hard masks at its learned rate)."""

_ROW_PACKET = 16
"""Every forward pass has a multiple of this many rows, so that a row's outputs are the same bits
wherever it sits in the pass. CPU kernels compute elementwise functions (exp in softplus or sigmoid,
tanh, ...) in vector packets of up to 16 float32 (AVX-512) and finish a ragged tail with scalar code
that rounds differently, and a single-row matrix product takes its own path; whole packets of rows
avoid both, so a request's samples do not depend on who shares its call."""


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


def _stochastic_call(layer: keras.layers.Layer, stream: int, draw: Draw):
    def call(inputs, *args, **kwargs):
        # inputs holds draw.count copies of the batch, sample-major: [count * n, ...].
        shape = tf.shape(inputs, out_type=tf.int64)
        per_sample = tf.reshape(inputs, tf.concat([[draw.count, shape[0] // draw.count], shape[1:]], 0))
        noise = tf.expand_dims(draw.noise(stream, noise_shape(layer, inputs), layer), 1)
        return tf.reshape(apply_noise(layer, per_sample, noise), shape)

    return call


def _segment_call(layer: keras.layers.Layer, stream: int, draws: SegmentDraws):
    def call(inputs, *args, **kwargs):
        noisy = apply_noise(layer, inputs, draws.noise(stream, noise_shape(layer, inputs), layer))
        return tf.ensure_shape(noisy, inputs.shape)  # the gathered noise has no static shape

    return call


@contextlib.contextmanager
def _dropout_switched_on(
    layers: list[keras.layers.Layer], draw: Draw | SegmentDraws, shared: tf.Tensor | None
) -> Iterator[None]:
    """Give each dropout layer a stochastic ``call`` while the forward pass is traced.

    The first dropout call reads ``shared`` (``_shared_prefix`` brought to the pass's rows) instead of its own
    input, so the layers before it are left out of the graph that runs (TensorFlow prunes ops whose outputs
    nothing reads).
    """
    stochastic = _segment_call if isinstance(draw, SegmentDraws) else _stochastic_call
    pending = [] if shared is None else [shared]

    def reading_shared(call: Callable) -> Callable:
        def first_reads_shared(inputs, *args, **kwargs):
            return call(pending.pop() if pending else inputs, *args, **kwargs)

        return first_reads_shared

    with _calls_replaced(layers, lambda stream, layer: reading_shared(stochastic(layer, stream, draw))):
        yield


@contextlib.contextmanager
def _calls_replaced(layers: list[keras.layers.Layer], call_of: Callable[[int, keras.layers.Layer], Callable]):
    """Each layer's ``call`` is ``call_of(its index, it)`` while the model is traced, then its own again."""
    for stream, layer in enumerate(layers):
        layer.call = call_of(stream, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.call


def _shared_prefix(model: keras.Model, layers: list[keras.layers.Layer], inputs: tf.Tensor) -> tf.Tensor | None:
    """What every MC sample of a row shares: the input of the first dropout call, computed once per row.

    The layers called before any dropout layer run in inference mode on each row alone, so their output is
    the same in every sample; computing it once instead of T times saves their share of the work (in the
    classic network, the first Dense: half the multiply-adds). The rows are padded to whole vector packets
    (``_ROW_PACKET``) as every pass's are. None: the model has no dropout layer.
    """
    captured = []

    def capture(inputs, *args, **kwargs):
        captured.append(inputs)
        return inputs

    rows = tf.shape(inputs)[0]
    padding = tf.concat([[[0, -rows % _ROW_PACKET]], tf.zeros([tf.rank(inputs) - 1, 2], tf.int32)], 0)
    with _calls_replaced(layers, lambda stream, layer: capture):
        model(tf.pad(inputs, padding), training=False)  # only the ops up to the first dropout call are kept
    return captured[0][:rows] if captured else None


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


def _one_seed(
    model: keras.Model, layers: list, inputs: tf.Tensor, shared: tf.Tensor | None, seed: tf.Tensor, first: tf.Tensor
):
    """``run(start, count)`` for ``_in_passes``: samples ``first + start ..`` of every row with one seed,
    the batch (and its ``_shared_prefix``) tiled sample-major."""

    def tiled(rows: tf.Tensor, drawn: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(rows, out_type=tf.int64)
        copies = tf.tile(rows[tf.newaxis], tf.concat([[drawn], tf.ones_like(shape)], 0))
        return tf.reshape(copies, tf.concat([[-1], shape[1:]], 0))

    def run(start: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(inputs, out_type=tf.int64)
        # A few samples more (dropped below) make the pass's rows whole vector packets (see _ROW_PACKET).
        packets = _ROW_PACKET // tf.maximum(tf.minimum(tf.bitwise.bitwise_and(shape[0], -shape[0]), _ROW_PACKET), 1)
        drawn = count + (-count) % packets
        draw = Draw(seed, first + start, drawn)
        with _dropout_switched_on(layers, draw, None if shared is None else tiled(shared, drawn)):
            outputs = model(tiled(inputs, drawn), training=False)
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
        shared = _shared_prefix(model, layers, inputs)
        run = _one_seed(model, layers, inputs, shared, tf.cast(seed, tf.int64), tf.constant(0, tf.int64))
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
        shared = _shared_prefix(model, layers, inputs)

        def run(start: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
            wanted = (start + tf.range(count))[:, tf.newaxis] < row_samples[tf.newaxis, :]  # [count, N]
            pairs = tf.where(wanted)  # (sample in pass, row), sample-major
            counts = tf.clip_by_value(samples - start, 0, count)  # each segment's samples in this pass
            offsets = tf.cumsum(counts, exclusive=True)
            slot = tf.gather(offsets, tf.gather(segments, pairs[:, 1])) + pairs[:, 0]
            padding = tf.zeros([-tf.shape(pairs)[0] % _ROW_PACKET], tf.int64)  # whole vector packets: _ROW_PACKET
            draws = SegmentDraws(seeds, first + start, counts, tf.concat([slot, padding], 0))
            rows = tf.concat([pairs[:, 1], padding], 0)
            with _dropout_switched_on(layers, draws, None if shared is None else tf.gather(shared, rows)):
                outputs = model(tf.gather(inputs, rows), training=False)
            outputs = outputs[: tf.shape(pairs)[0]]
            shape = tf.concat([[count, batch], tf.shape(outputs, tf.int64)[1:]], 0)
            every_row = tf.size(pairs, tf.int64) == 2 * count * batch  # then pairs are in order: no scatter
            return tf.cond(every_row, lambda: tf.reshape(outputs, shape), lambda: tf.scatter_nd(pairs, outputs, shape))

        def one_segment() -> tf.Tensor:
            run_alone = _one_seed(model, layers, inputs, shared, seeds[0], first[0])
            return _in_passes(model, rows_per_pass, batch, total, run_alone)

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
