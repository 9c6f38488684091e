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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from training.concrete import ConcreteDropout

DROPOUT_LAYERS = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout, ConcreteDropout)
"""Layer types switched on for MC sampling (SpatialDropout1D/2D/3D subclass ``Dropout``; ``ConcreteDropout``
samples hard masks at its learned rate)."""

_PHILOX = tf.random.Algorithm.PHILOX.value
_FLOATS_PER_PHILOX_BLOCK = 4  # one Philox counter step yields four float32 numbers
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

    def uniform(self, stream: int, per_sample_shape: tf.Tensor) -> tf.Tensor:
        """Uniform [0, 1) noise of shape ``[count, *per_sample_shape]`` for one layer.

        Sample ``t`` reads its own fixed stretch of the Philox stream keyed by
        ``(seed, stream)``, so a sample's noise does not depend on how samples are chunked.
        """
        key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(
            seed=tf.stack([self.seed, tf.constant(stream, tf.int64)])
        )
        size = tf.reduce_prod(per_sample_shape)
        blocks = (size + _FLOATS_PER_PHILOX_BLOCK - 1) // _FLOATS_PER_PHILOX_BLOCK
        offset = tf.cast(tf.stack([self.first * blocks, tf.constant(0, tf.int64)]), tf.uint64)
        count = tf.cast(self.count, tf.int64)
        flat = tf.raw_ops.StatelessRandomUniformV2(
            shape=tf.stack([count * blocks * _FLOATS_PER_PHILOX_BLOCK]),
            key=key,
            counter=counter + offset,
            alg=_PHILOX,
            dtype=tf.float32,
        )
        per_sample = tf.reshape(flat, tf.stack([count, blocks * _FLOATS_PER_PHILOX_BLOCK]))[:, :size]
        return tf.reshape(per_sample, tf.concat([[count], per_sample_shape], 0))


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


def _apply_noise(layer: keras.layers.Layer, x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Keras' training-mode formula for ``layer``, with ``u`` as its uniform noise."""
    if isinstance(layer, ConcreteDropout):  # hard Bernoulli masks at the learned rate, read from its variable
        rate = tf.cast(layer.probability(), x.dtype)
        return x * tf.cast(u >= rate, x.dtype) / (1.0 - rate)
    rate = layer.rate
    if isinstance(layer, keras.layers.GaussianDropout):
        normal = tf.math.ndtri(u + 2.0**-25)  # u + 2**-25 lies in (0, 1): finite quantiles
        return x * tf.cast(1.0 + math.sqrt(rate / (1.0 - rate)) * normal, x.dtype)
    kept = tf.cast(u >= rate, x.dtype)
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
        noise = tf.expand_dims(draw.uniform(stream, _noise_shape(layer, inputs)), 1)
        return tf.reshape(_apply_noise(layer, per_sample, noise), shape)

    return call


@contextlib.contextmanager
def _dropout_switched_on(layers: list[keras.layers.Layer], draw: _Draw) -> Iterator[None]:
    """Give each dropout layer a stochastic ``call`` while the forward pass is traced."""
    for stream, layer in enumerate(layers):
        layer.call = _stochastic_call(layer, stream, draw)
    try:
        yield
    finally:
        for layer in layers:
            del layer.call


def mc_dropout_fn(model: keras.Model, rows_per_pass: int):
    """A graph function ``(inputs, samples, seed) -> outputs [samples, batch, ...]``.

    All samples run in one call: the batch is tiled and pushed through the network once per
    chunk of samples, each chunk holding at most ``rows_per_pass`` rows (at least one sample),
    so memory stays bounded for any ``samples``. Trace it with an input signature.
    """
    layers = dropout_layers(model)

    def mc_dropout(inputs: tf.Tensor, samples: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        samples = tf.cast(samples, tf.int64)
        seed = tf.cast(seed, tf.int64)
        tf.debugging.assert_positive(samples, message="samples must be at least 1")
        batch = tf.shape(inputs, out_type=tf.int64)[0]
        per_pass = tf.maximum(tf.constant(rows_per_pass, tf.int64) // tf.maximum(batch, 1), 1)
        chunks = tf.TensorArray(model.compute_dtype, size=0, dynamic_size=True, infer_shape=False)

        def one_pass(first: tf.Tensor, chunks: tf.TensorArray):
            count = tf.minimum(per_pass, samples - first)
            tiled = tf.tile(
                inputs[tf.newaxis], tf.concat([[count], tf.ones_like(tf.shape(inputs, out_type=tf.int64))], 0)
            )
            rows = tf.reshape(tiled, tf.concat([[-1], tf.shape(inputs, out_type=tf.int64)[1:]], 0))
            with _dropout_switched_on(layers, _Draw(seed, first, count)):
                outputs = model(rows, training=False)
            outputs = tf.reshape(outputs, tf.concat([[count, batch], tf.shape(outputs, out_type=tf.int64)[1:]], 0))
            return first + count, chunks.write(tf.cast(first // per_pass, tf.int32), outputs)

        _, chunks = tf.while_loop(lambda first, _: first < samples, one_pass, (tf.constant(0, tf.int64), chunks))
        return tf.ensure_shape(chunks.concat(), [None, None, *model.outputs[0].shape[1:]])

    return mc_dropout


def sample(model: keras.Model, inputs: np.ndarray, samples: int, seed: int, rows_per_pass: int = 2**15) -> np.ndarray:
    """Run ``mc_dropout_fn`` on an in-memory model (what the exported signature computes)."""
    fn = tf.function(mc_dropout_fn(model, rows_per_pass), autograph=False)
    outputs = fn(tf.constant(inputs, tf.float32), tf.constant(samples, tf.int32), tf.constant(seed, tf.int64))
    return outputs.numpy()
