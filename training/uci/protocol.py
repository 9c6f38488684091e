"""Gal & Ghahramani's UCI protocol (ICML 2016) run through our own export path.

Per split, as in the paper's code: the last 20 % of the split's training rows are the validation
rows; for every grid point a net Dropout(p) -> Dense(H, relu) -> Dropout(p) -> Dense(O) is trained
on the other 80 %, with inputs and target standardized by the statistics of the rows it trains on,
``n_epochs x multiplier`` epochs (100x: the published table's setting); the point with the best MC
validation log-likelihood is retrained on the whole training split; its test RMSE and
log-likelihood come from T MC samples of the exported SavedModel's ``mc_dropout`` signature.

Likelihoods: ``homoscedastic`` (the paper's: MSE, grid p x tau, one noise level tau) and
``heteroscedastic`` (Kendall & Gal 2017: the net predicts mean and log-variance, Gaussian NLL, grid
p only, λ = l² (1 - p) / (2 N)), trained with the β-NLL (``beta``, 0.5 by default; 0 = plain NLL).

Randomness: each network has its own key, derived from the run seed, the phase, the split and the
dropout rate. Its initial weights, shuffles, training masks and validation MC masks come from that
key alone, so a split's results do not depend on which other splits run or how networks are chunked
(up to float rounding: batched matmuls of other batch sizes may round differently). A run is
deterministic for its seed and splits. Grid networks that differ only in tau share their key (common
random numbers): each is still trained exactly as alone, the tau comparison is not blurred by
different draws, and the trainer draws the shared noise once, which is most of an epoch's cost.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import artifact, metrics, signatures
from training.artifact import Likelihood
from training.model import DEFAULT_BETA
from training.uci.data import (
    LENGTH_SCALE,
    VALIDATION_FRACTION,
    Standardization,
    UciDataset,
    dataset_folders,
    load_dataset,
    network_key,
    weight_decay,
)
from training.uci.report import PUBLISHED, mean_and_standard_error, write_results
from training.uci.scoring import mc_scores
from training.uci.trainer import BATCH_SIZE, Weights, train_networks

_GRID, _FINAL = 0, 1  # phases, part of each network's key
DEFAULT_EPOCHS_MULTIPLIER = 100
"""The published table's epochs (4,000 for n_epochs 40); see docs/benchmarks.md."""

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass
class _Job:
    """One network to train: its rows (standardized by ``scaling``), hyper-parameters and key."""

    split: int
    rate: float
    tau: float | None
    """None: heteroscedastic (the network predicts its noise)."""
    x: np.ndarray
    y: np.ndarray
    scaling: Standardization
    decay: tuple[float, float]
    key: np.ndarray


def _train_jobs(jobs: list[_Job], epochs: int, hidden: int, outputs: int, beta: float, label: str, log: Log) -> Weights:
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
            outputs=outputs,
            beta=beta,
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
            np.array([1.0 if job.tau is None else job.tau for job in group]),
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

    likelihood: Likelihood = "homoscedastic" if job.tau is not None else "heteroscedastic"
    config = ModelConfig(hidden=(data.n_hidden,), dropout=job.rate, input_dropout=job.rate, weight_decay=job.decay)
    network = build_network(config, (data.x.shape[1],), 1, "regression", likelihood)
    kinds = [type(layer).__name__ for layer in network.layers]
    expected = ["InputLayer", *(["Dropout"] if job.rate else []), "Dense", "Dropout", "Dense"]
    if kinds != expected or network.layers[-3].activation is not keras.activations.relu:
        raise RuntimeError(f"build_network no longer makes the paper's network: {kinds}")
    dense = [layer for layer in network.layers if isinstance(layer, keras.layers.Dense)]
    w = weights.keras(0)
    dense[0].set_weights(w[:2])
    dense[1].set_weights(w[2:])
    s = job.scaling
    served = with_preprocessing(network, s.x_mean, s.x_std, np.array([s.y_mean]), np.array([s.y_std]), likelihood)
    path = export_model(
        served,
        repository,
        f"{data.name}-split{job.split}" if job.tau is not None else f"{data.name}-heteroscedastic-split{job.split}",
        task="regression",
        tau=job.tau,
        likelihood=likelihood,
        preprocessing=Preprocessing(
            inputs="standardized per feature (training split mean, std)",
            outputs="network predicts the standardized target; the graph restores its units",
            input_shift=s.x_mean.tolist(),
            input_scale=s.x_std.tolist(),
            target_shift=[s.y_mean],
            target_scale=[s.y_std],
        ),
        metrics={"validation_mc": validation},
        training={
            "protocol": "Gal & Ghahramani UCI",
            "split": job.split,
            "dropout": job.rate,
            "tau": job.tau,
            "likelihood": likelihood,
        },
    )
    loaded = tf.saved_model.load(str(path))
    test = data.splits[job.split][1]
    targets = data.y[test][:, None]
    draws = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], data.x[test], samples, seed)
    mc, variance = draws.outputs, draws.variance
    deterministic = signatures.infer(loaded.signatures[artifact.SERVING_SIGNATURE], data.x[test])
    if variance is None:
        ll = metrics.mc_log_likelihood(targets, mc, job.tau)
    else:
        ll = metrics.gaussian_mixture_log_likelihood(targets, mc, variance)
    return {
        "rmse_mc": metrics.rmse(mc.mean(axis=0), targets),
        "rmse_deterministic": metrics.rmse(deterministic, targets),
        "ll": ll,
        "mc_seed": seed,
        "artifact": str(path),
    }


def run(
    data: UciDataset,
    *,
    splits: Sequence[int] | None = None,
    epochs_multiplier: int = DEFAULT_EPOCHS_MULTIPLIER,
    samples: int = 10_000,
    seed: int = 0,
    likelihood: Likelihood = "homoscedastic",
    beta: float = DEFAULT_BETA,
    repository: str | Path,
    log: Log = _print,
) -> dict:
    """The full protocol on ``data``; returns the results (see ``report.write_results`` for the files)."""
    splits = list(range(len(data.splits)) if splits is None else splits)
    if not splits or any(not 0 <= k < len(data.splits) for k in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct numbers in 0..{len(data.splits) - 1}, got {splits}")
    if epochs_multiplier < 1 or samples < 1 or seed < 0:
        raise ValueError("epochs multiplier and samples must be at least 1, seed at least 0")
    tf.config.experimental.enable_op_determinism()
    epochs = data.n_epochs * epochs_multiplier
    heteroscedastic = likelihood == "heteroscedastic"
    taus: list[float | None] = [None] if heteroscedastic else list(data.tau_values)
    grid = [(p, tau) for p in data.dropout_rates for tau in taus]
    hidden, outputs = data.n_hidden, 2 if heteroscedastic else 1
    timings: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    log(
        f"{data.name}: {len(data.y)} rows, {data.x.shape[1]} features, splits {splits}, "
        f"{likelihood}, grid {len(grid)} ({'p' if heteroscedastic else 'p x tau'}), {epochs} epochs, T = {samples}"
    )

    # Grid search: every (split, p, tau) on the split's first 80 %, scored on the last 20 %.
    jobs, x_val, y_val = [], [], []
    for k in splits:
        train = data.splits[k][0]
        n_fit = int(len(train) * (1 - VALIDATION_FRACTION))
        fit, val = train[:n_fit], train[n_fit:]
        scaling = Standardization.fit(data.x[fit], data.y[fit])
        for p, tau in grid:
            decay = weight_decay(p, 1.0 if tau is None else tau, n_fit, hidden)
            key = network_key(seed, _GRID, k, data.dropout_rates.index(p))  # shared by the split's taus, see above
            jobs.append(_Job(k, p, tau, scaling.inputs(data.x[fit]), scaling.target(data.y[fit]), scaling, decay, key))
            x_val.append(data.x[val])
            y_val.append(data.y[val])
    t0 = time.perf_counter()
    weights = _train_jobs(jobs, epochs, hidden, outputs, beta, "grid search", log)
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
        decay = weight_decay(p, 1.0 if tau is None else tau, len(train), hidden)
        key = network_key(seed, _FINAL, k, 0)
        finals.append(
            _Job(k, p, tau, scaling.inputs(data.x[train]), scaling.target(data.y[train]), scaling, decay, key)
        )
    t0 = time.perf_counter()
    final_weights = _train_jobs(finals, epochs, hidden, outputs, beta, "retrain", log)
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
            f"  split {job.split}: p={job.rate:g}, tau={'-' if job.tau is None else f'{job.tau:g}'}, "
            f"rmse={test['rmse_mc']:.3f} "
            f"(deterministic {test['rmse_deterministic']:.3f}), ll={test['ll']:.3f}"
        )
    timings["export_and_test_mc_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    timings["cpu_s"] = time.process_time() - cpu_started

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
            "likelihood": likelihood,
            "beta": beta if heteroscedastic else None,
            "hidden": hidden,
            "batch_size": BATCH_SIZE,
            "length_scale": LENGTH_SCALE,
            "validation_fraction": VALIDATION_FRACTION,
            "dropout_rates": data.dropout_rates,
            "tau_values": data.tau_values if not heteroscedastic else None,
        },
        "summary": summary,
        "published": PUBLISHED.get(data.name),
        "timings": timings,
        "splits": rows,
        "machine": {"cpus": _cpus(), "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU"))},
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(
    data_dirs: Sequence[str | Path],
    *,
    splits: Sequence[int] | None,
    epochs_multiplier: int,
    samples: int,
    seed: int,
    likelihood: Likelihood = "homoscedastic",
    beta: float = DEFAULT_BETA,
    out: str | Path,
    repository: str | Path | None,
    jobs: int | None = 1,
    log: Log = _print,
) -> list[dict]:
    """``python -m training uci``: every data set folder found in ``data_dirs``, results into ``out``.

    ``jobs`` > 1 (None: one per core) runs that many data sets at once, each in its own process with ``cores / jobs``
    TensorFlow threads: the data sets are independent, and one process keeps about one core busy
    (tiny networks; most of the work is Python-dispatched steps and random draws), so two processes
    on two cores take about half the wall time. Each data set's numbers are its sequential run's,
    up to float rounding (thread counts may change the order of a kernel's sums).
    """
    folders = [folder for path in data_dirs for folder in dataset_folders(path)]
    one = partial(
        _run_folder,
        splits=splits,
        epochs_multiplier=epochs_multiplier,
        samples=samples,
        seed=seed,
        likelihood=likelihood,
        beta=beta,
        out=Path(out),
        repository=Path(repository or Path(out) / "models"),
        log=log,
    )
    jobs = min(jobs or _cpus(), len(folders))
    if jobs <= 1:
        return [one(folder) for folder in folders]
    threads = max(1, _cpus() // jobs)
    spawn = multiprocessing.get_context("spawn")  # TensorFlow does not survive a fork
    with ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_limit_threads, initargs=(threads,)) as pool:
        return list(pool.map(one, folders))


def _run_folder(folder: Path, *, out: Path, log: Log, **settings) -> dict:
    data = load_dataset(folder)
    result = run(data, log=partial(_tagged, log, data.name), **settings)
    for path in write_results(result, out):
        log(f"wrote {path}")
    return result


def _tagged(log: Log, tag: str, line: str) -> None:
    log(f"[{tag}] {line}")


def _limit_threads(threads: int) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
