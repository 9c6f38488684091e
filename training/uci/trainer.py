"""The stacked trainer: G one-hidden-layer networks trained at once, each exactly as Keras ``fit`` alone.

Why: the protocol trains splits x grid + splits networks for 4,000 epochs each, which takes many
hours with Keras ``fit`` one network at a time on two cores. Here all networks of one phase are
trained at once as stacked weights (kernels ``[G, d, H]``, ``[G, H, O]``) with batched matmuls in one
compiled loop. Every network keeps its own rows, dropout rate, weight decay, Adam moments, per-epoch
shuffle and dropout masks, so each follows exactly the math of training it alone;
``tests/test_uci.py`` checks that against Keras ``fit``.

Two likelihoods: homoscedastic (O = 1, MSE on the standardized target, the paper's model) and
heteroscedastic (O = 2: mean and log-variance, Gaussian NLL, ``training.model.gaussian_nll``).
Two kinds of dropout: a fixed rate per network, or learned rates (Concrete Dropout, Gal, Hron &
Kendall 2017: one ``p_logit`` per dropout layer and network, the relaxed-Bernoulli mask and the
concrete regularizers of ``training.concrete``), as ``build_network(ModelConfig(concrete=True))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from training.concrete import negative_entropy, relaxed_dropout
from training.model import gaussian_nll

BATCH_SIZE = 128
LEARNING_RATE, BETA_1, BETA_2, EPSILON = 1e-3, 0.9, 0.999, 1e-7  # Keras' Adam defaults
_TRAIN_BUDGET = 2**24
"""Most float32 elements of the largest tensor (an epoch's dropout noise)."""
TRAIN_STREAM, MC_STREAM = 0, 1


@dataclass
class Weights:
    """G one-hidden-layer networks, stacked on a leading axis (Keras' kernel/bias layout per network)."""

    w1: np.ndarray  # [G, d, H]
    b1: np.ndarray  # [G, H]
    w2: np.ndarray  # [G, H, O]: O = 1 (homoscedastic) or 2 (mean, log-variance)
    b2: np.ndarray  # [G, O]
    p_logit: np.ndarray | None = None
    """Concrete dropout: ``[G, 2]`` logits of the learned rates (input layer, hidden layer); None: fixed rates."""

    def arrays(self) -> list[np.ndarray]:
        """The trained tensors: kernels and biases, then the rates' logits of a concrete network."""
        return [self.w1, self.b1, self.w2, self.b2] + ([] if self.p_logit is None else [self.p_logit])

    def take(self, rows: Sequence[int] | np.ndarray) -> Weights:
        rows = np.asarray(rows)
        return Weights(*(a[rows] for a in self.arrays()))

    def keras(self, g: int) -> list[np.ndarray]:
        """Network ``g``'s weights in ``build_network``'s order (a ConcreteDropout's ``p_logit`` before its Dense)."""
        if self.p_logit is None:
            return [self.w1[g], self.b1[g], self.w2[g], self.b2[g]]
        return [self.p_logit[g, 0], self.w1[g], self.b1[g], self.p_logit[g, 1], self.w2[g], self.b2[g]]

    def rates(self) -> np.ndarray:
        """Learned rates ``[G, 2]`` (input, hidden), computed as ``ConcreteDropout.rate`` reports them."""
        if self.p_logit is None:
            raise ValueError("networks with fixed dropout rates have no learned rates")
        return 1.0 / (1.0 + np.exp(-self.p_logit.astype(np.float64)))

    @classmethod
    def concat(cls, parts: Sequence[Weights]) -> Weights:
        return cls(*(np.concatenate(arrays) for arrays in zip(*(p.arrays() for p in parts), strict=True)))

    @classmethod
    def glorot(cls, keys: np.ndarray, inputs: int, hidden: int, outputs: int = 1) -> Weights:
        """Keras' defaults per network (glorot-uniform kernels, zero biases), drawn from its key."""

        def uniform(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)

        rngs = [np.random.default_rng(key) for key in keys]
        g = len(keys)
        return cls(
            np.stack([uniform(rng, inputs, hidden) for rng in rngs]),
            np.zeros((g, hidden), np.float32),
            np.stack([uniform(rng, hidden, outputs) for rng in rngs]),
            np.zeros((g, outputs), np.float32),
        )


def training_loss(params, x, y, noise, rates, decays, beta: float = 0.0, dropout_regularizers=None) -> tf.Tensor:
    """Per-network Keras loss of one batch: MSE + Σ λ ΣW² (kernels only), inverted dropout from ``noise``.

    With two outputs per network (``w2 [G, H, 2]``) the data term is the Gaussian NLL of
    ``y`` under (mean, log-variance) instead of the MSE (β-NLL with ``beta > 0``).

    ``x [G, B, d]``, ``y [G, B, 1]``, ``noise [G, B, d + H]`` uniform in [0, 1) (an element is kept
    when its noise is >= p, as in ``tf.nn.dropout``), ``rates [G]``, ``decays [G, 2]``; returns ``[G]``.

    Concrete networks (``params`` ends with ``p_logit [G, 2]``; ``rates`` unused): the relaxed
    masks from the same noise, ``decays`` are the ``ConcreteL2`` factors (``λ ΣW² / (1 - p)``), and
    ``dropout_regularizers [G]`` weighs each layer's ``width · negative_entropy(p)``, as the layers add them.
    """
    w1, b1, w2, b2 = params[:4]
    d = x.shape[-1]
    if len(params) == 5:
        p = tf.sigmoid(params[4])  # [G, 2]
        p_in, p_hidden = p[:, 0, None, None], p[:, 1, None, None]
        x = relaxed_dropout(x, p_in, noise[..., :d])
        h = relaxed_dropout(tf.nn.relu(tf.matmul(x, w1) + b1[:, None, :]), p_hidden, noise[..., d:])
        kept = 1.0 - p
        widths = tf.constant([d, w1.shape[2]], tf.float32)
        rate_terms = tf.reduce_sum(dropout_regularizers[:, None] * widths * negative_entropy(p), axis=1)
    else:
        rate = rates[:, None, None]
        scale = 1.0 / (1.0 - rate)
        x = x * scale * tf.cast(noise[..., :d] >= rate, x.dtype)
        h = tf.nn.relu(tf.matmul(x, w1) + b1[:, None, :])
        h = h * scale * tf.cast(noise[..., d:] >= rate, h.dtype)
        kept, rate_terms = tf.ones_like(decays), 0.0
    out = tf.matmul(h, w2) + b2[:, None, :]
    if out.shape[-1] == 2:
        data = tf.reduce_mean(gaussian_nll(y, out[..., :1], out[..., 1:], beta), axis=1)
    else:
        data = tf.reduce_mean(tf.square(out - y), axis=[1, 2])
    first = decays[:, 0] * tf.reduce_sum(tf.square(w1), [1, 2]) / kept[:, 0]
    second = decays[:, 1] * tf.reduce_sum(tf.square(w2), [1, 2]) / kept[:, 1]
    return data + first + second + rate_terms


def stream_seed(key: tf.Tensor, *data) -> tf.Tensor:
    """The stateless seed of the stream ``data`` (a tuple of integers) under ``key``; streams are independent."""
    for value in data:
        key = tf.random.experimental.stateless_fold_in(key, value)
    return key


def epoch_draw(keys: tf.Tensor, epoch: tf.Tensor, rows: int, width: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Each key's row order ``[K, rows]`` and dropout noise ``[K, rows, width]`` for one epoch.

    Both come from the key (``keys [K, 2]``) and the epoch alone. Drawing the noise is most of an
    epoch's cost (Philox, one float per row and unit), so the sort runs once for all keys, outside the loop.
    """

    def one(key):
        sort_keys = tf.random.stateless_uniform([rows], stream_seed(key, TRAIN_STREAM, epoch, 0), None, None, tf.int64)
        noise = tf.random.stateless_uniform([rows, width], stream_seed(key, TRAIN_STREAM, epoch, 1))
        return sort_keys, noise

    signature = (tf.TensorSpec([rows], tf.int64), tf.TensorSpec([rows, width], tf.float32))
    sort_keys, noise = tf.map_fn(one, keys, fn_output_signature=signature, parallel_iterations=16)
    return tf.argsort(sort_keys, axis=-1), noise


def _adam_step(params, m, v, iterations, x, y, noise, rates, decays, beta: float, dropout_regularizers) -> None:
    """One Keras Adam step on G stacked networks; moments are elementwise, so each network has its own."""
    with tf.GradientTape() as tape:
        # Σ_g: no cross-network terms
        loss = tf.reduce_sum(training_loss(params, x, y, noise, rates, decays, beta, dropout_regularizers))
    grads = tape.gradient(loss, params)
    iterations.assign_add(1)
    t = tf.cast(iterations, tf.float32)
    alpha = LEARNING_RATE * tf.sqrt(1 - tf.pow(BETA_2, t)) / (1 - tf.pow(BETA_1, t))
    for var, g, m_var, v_var in zip(params, grads, m, v, strict=True):
        m_var.assign_add((g - m_var) * (1 - BETA_1))
        v_var.assign_add((tf.square(g) - v_var) * (1 - BETA_2))
        var.assign_sub(m_var * alpha / (tf.sqrt(v_var) + EPSILON))


@tf.function
def _run_epochs(
    params, m, v, iterations, x, y, rates, decays, dropout_regularizers, keys, stream, first, count, batch_size, beta
) -> None:
    """Epochs ``first .. first + count - 1``: shuffle each network's rows, then its batches in order.

    ``keys [K, 2]`` are the distinct keys, ``stream [G]`` each network's place in them.
    """
    n, d = x.shape[1], x.shape[2]
    for epoch in tf.range(first, first + count):
        order, noise = epoch_draw(keys, epoch, n, d + params[0].shape[2])
        _epoch_steps(
            params, m, v, iterations, x, y, order, noise, stream, rates, decays, dropout_regularizers, batch_size, beta
        )


@tf.function(jit_compile=True)  # XLA fuses the many small ops of an epoch's steps: faster on CPU
def _epoch_steps(
    params, m, v, iterations, x, y, order, noise, stream, rates, decays, dropout_regularizers, batch_size, beta
) -> None:
    """One epoch's Adam steps: each network's rows in its shuffled order, batches in order, the last one smaller."""
    n = x.shape[1]
    order, noise = tf.gather(order, stream), tf.gather(noise, stream)
    xs = tf.gather(x, order, batch_dims=1)
    ys = tf.gather(y, order, batch_dims=1)
    for start in range(0, n, batch_size):  # unrolled: a handful of batches per epoch
        end = min(n, start + batch_size)
        batch = (xs[:, start:end], ys[:, start:end], noise[:, start:end])
        _adam_step(params, m, v, iterations, *batch, rates, decays, beta, dropout_regularizers)


def train_networks(
    x: np.ndarray,
    y: np.ndarray,
    rates: np.ndarray,
    decays: np.ndarray,
    keys: np.ndarray,
    epochs: int,
    *,
    init: Weights | None = None,
    hidden: int = 50,
    outputs: int = 1,
    beta: float = 0.0,
    dropout_regularizers: np.ndarray | None = None,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int, int, int, int], None] | None = None,
) -> Weights:
    """Train G networks at once, each exactly as Keras ``fit(shuffle=True)`` would train it alone.

    ``x [G, n, d]`` and ``y [G, n]`` are each network's (standardized) training rows, ``rates [G]``
    its dropout rate on the input and hidden layer, ``decays [G, 2]`` its L2 factors of the two
    kernels, ``keys [G, 2]`` its random key (init, shuffles, masks; networks given the same key share
    them, and each key's draws are made once per epoch); ``outputs`` 2 makes
    heteroscedastic networks (mean, log-variance; ``beta`` of their β-NLL). ``dropout_regularizers
    [G]`` makes concrete networks: their rates are learned, starting at ``rates``, and ``decays`` are
    their ``ConcreteL2`` factors (see ``training_loss``). ``init`` overrides the glorot-uniform start.
    Networks are trained in chunks that bound memory; ``progress(chunk, chunks, epochs_done, epochs)``
    is called after each block of epochs.
    """
    g, n, d = x.shape
    init = init if init is not None else Weights.glorot(keys, d, hidden, outputs)
    if dropout_regularizers is not None and init.p_logit is None:
        logits = (np.log(rates) - np.log(1.0 - rates)).astype(np.float32)  # ConcreteDropout's initializer
        init = Weights(init.w1, init.b1, init.w2, init.b2, np.stack([logits, logits], axis=1))
    chunk = max(1, _TRAIN_BUDGET // (n * (d + init.w1.shape[2])))  # an epoch's dropout noise is the largest tensor
    block = max(1, epochs // 10)
    parts = []
    chunks = math.ceil(g / chunk)
    for start in range(0, g, chunk):
        rows = slice(start, start + chunk)
        part = init.take(range(g)[rows])
        params = [tf.Variable(w) for w in part.arrays()]
        m, v = ([tf.Variable(tf.zeros_like(w)) for w in params] for _ in "mv")
        iterations = tf.Variable(0, dtype=tf.int64)
        data = [tf.constant(a, tf.float32) for a in (x[rows], y[rows][..., None], rates[rows], decays[rows])]
        data.append(None if dropout_regularizers is None else tf.constant(dropout_regularizers[rows], tf.float32))
        distinct, stream = np.unique(keys[rows], axis=0, return_inverse=True)
        data += [tf.constant(distinct, tf.int64), tf.constant(stream.reshape(-1), tf.int32)]
        for first in range(0, epochs, block):
            count = min(block, epochs - first)
            epochs_range = (tf.constant(first, tf.int64), tf.constant(count, tf.int64))
            _run_epochs(params, m, v, iterations, *data, *epochs_range, batch_size, beta)
            if progress:
                progress(start // chunk + 1, chunks, first + count, epochs)
        parts.append(Weights(*(w.numpy() for w in params)))
    return Weights.concat(parts)
