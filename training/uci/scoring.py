"""Validation scores of in-memory stacked networks: MC log-likelihood and RMSE, T samples in chunks.

The grid search picks each split's hyper-parameters by these scores. Each MC sample is one network
draw shared by the validation rows, like the exported ``mc_dropout``; predictions are in the target's
original units, as the test scores.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from training.uci.trainer import MC_STREAM, Weights, stream_seed

MC_CHUNK = 100
"""Validation MC samples drawn per network and pass; fixed, so the draws never depend on memory."""
_MC_BUDGET = 2**23
"""Most float32 elements of one MC pass's hidden layer."""


def _mc_chunk(params, x, y, y_mean, y_std, rates, taus, u, heteroscedastic: bool):
    """One chunk of S network draws (``u [G, S, d + H]``, one mask per draw shared by the n rows).

    ``rates [G, 2]``: each network's rate on the input and on the hidden layer.

    Returns, per network and row, ``logsumexp_s(-tau/2 (y - ŷ_s)²)`` and ``Σ_s ŷ_s`` in original units;
    heteroscedastic: ``logsumexp_s log N(y; ŷ_s, σ²_s)`` (constants included) and ``Σ_s ŷ_s``.
    Both masks are folded into the kernels, so the only ``[G, S, n, H]`` work is one matmul and a relu.
    """
    w1, b1, w2, b2 = params
    d = tf.shape(x)[2]
    rate = tf.repeat(rates, tf.stack([d, tf.shape(w1)[2]]), axis=1)[:, None, :]  # [G, 1, d + H]: input, hidden
    keep = tf.cast(u >= rate, tf.float32) / (1.0 - rate)  # [G, S, d + H]
    h = tf.nn.relu(tf.matmul(x[:, None], keep[..., :d, None] * w1[:, None]) + b1[:, None, None, :])  # [G, S, n, H]
    out = tf.matmul(h, keep[..., d:, None] * w2[:, None]) + b2[:, None, None, :]  # [G, S, n, O]
    pred = tf.cast(out[..., 0], tf.float64) * y_std[:, None, None] + y_mean[:, None, None]
    if heteroscedastic:
        log_variance = tf.cast(out[..., 1], tf.float64) + 2 * tf.math.log(y_std)[:, None, None]
        squared = tf.square(y[:, None, :] - pred) * tf.exp(-log_variance)
        exponent = -0.5 * (squared + log_variance + math.log(2 * math.pi))
    else:
        exponent = -0.5 * taus[:, None, None] * tf.square(y[:, None, :] - pred)
    return tf.reduce_logsumexp(exponent, axis=1), tf.reduce_sum(pred, axis=1)


@tf.function(reduce_retracing=True)
def _mc_scores(params, x, y, y_mean, y_std, rates, taus, keys, samples, heteroscedastic: bool):
    """MC log-likelihood and RMSE of the MC mean per network, in original units, samples in chunks."""
    g, n = tf.shape(x)[0], tf.shape(x)[1]
    width = tf.shape(x)[2] + tf.shape(params[0])[2]
    lse = tf.fill([g, n], tf.constant(-np.inf, tf.float64))
    total = tf.zeros([g, n], tf.float64)
    for c in tf.range((samples + MC_CHUNK - 1) // MC_CHUNK):
        count = tf.minimum(MC_CHUNK, samples - c * MC_CHUNK)

        def one(key, c=c, count=count):
            return tf.random.stateless_uniform(tf.stack([count, width]), stream_seed(key, MC_STREAM, c))

        u = tf.map_fn(one, keys, fn_output_signature=tf.TensorSpec([None, None], tf.float32))
        chunk_lse, chunk_total = _mc_chunk(params, x, y, y_mean, y_std, rates, taus, u, heteroscedastic)
        lse = tf.reduce_logsumexp(tf.stack([lse, chunk_lse]), axis=0)
        total += chunk_total
    t = tf.cast(samples, tf.float64)
    ll = tf.reduce_mean(lse, axis=1) - tf.math.log(t)
    if not heteroscedastic:
        ll = ll - 0.5 * math.log(2 * math.pi) + 0.5 * tf.math.log(taus)
    rmse = tf.sqrt(tf.reduce_mean(tf.square(y - total / t), axis=1))
    return ll, rmse


def mc_scores(
    weights: Weights,
    x: np.ndarray,
    y: np.ndarray,
    y_mean: np.ndarray,
    y_std: np.ndarray,
    rates: np.ndarray,
    taus: np.ndarray,
    keys: np.ndarray,
    samples: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Validation scores of G in-memory networks: (MC log-likelihood [G], MC-mean RMSE [G]).

    ``x [G, n, d]`` standardized, ``y [G, n]`` in original units; predictions are de-standardized
    with ``y_mean``/``y_std`` so ``taus`` are in original units, as for the test scores. ``rates``
    are ``[G]`` (one rate for both layers) or ``[G, 2]`` (input, hidden: learned rates). Each MC
    sample is one network draw shared by the n rows, like the exported ``mc_dropout``. Networks with
    two outputs are heteroscedastic (``taus`` unused): the LL is the mixture of their Gaussians.
    """
    g, n, _ = x.shape
    rates = np.broadcast_to(rates[:, None], (g, 2)) if rates.ndim == 1 else rates
    chunk = max(1, _MC_BUDGET // (MC_CHUNK * n * weights.w1.shape[2]))
    lls, rmses = [], []
    for start in range(0, g, chunk):
        rows = np.arange(start, min(g, start + chunk))
        part = weights.take(rows)
        ll, rmse = _mc_scores(
            [tf.constant(w) for w in (part.w1, part.b1, part.w2, part.b2)],
            tf.constant(x[rows], tf.float32),
            tf.constant(y[rows], tf.float64),
            tf.constant(y_mean[rows], tf.float64),
            tf.constant(y_std[rows], tf.float64),
            tf.constant(rates[rows], tf.float32),
            tf.constant(taus[rows], tf.float64),
            tf.constant(keys[rows], tf.int64),
            tf.constant(samples, tf.int32),
            weights.w2.shape[2] == 2,
        )
        lls.append(ll.numpy())
        rmses.append(rmse.numpy())
    return np.concatenate(lls), np.concatenate(rmses)
