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

Dropout: ``grid`` (the paper's: p from ``dropout_rates.txt`` is a grid axis) or ``concrete`` (Gal,
Hron & Kendall 2017: each dropout layer of each network learns its rate, starting at 0.1, with the
regularizers ``python -m training --dropout concrete`` uses: weights l² / N, rates 2 / N). p is then
no grid axis; what is left to choose is τ for the homoscedastic model and nothing for the
heteroscedastic one (its grid phase only yields the validation scores). The homoscedastic model is
trained on the MSE, which is the Gaussian NLL divided by τ/2, so both regularizers are divided by
the precision in the units it trains in, τ y_std² (the paper's ``2 / (N τ)`` form): without that the
rate regularizer outweighs the MSE of a low-noise target (Energy) and the rates grow far too large.
``concrete_scales`` (default 1, the paper's) optionally makes a grid axis of a factor s on both
regularizers (N / s effective rows: a stronger prior keeps the rates from collapsing to 0), chosen
like the rest on validation rows.

Randomness: each network has its own key, derived from the run seed, the phase, the split and the
dropout rate. Its initial weights, shuffles, training masks and validation MC masks come from that
key alone, so a split's results do not depend on which other splits run or how networks are chunked
(up to float rounding: batched matmuls of other batch sizes may round differently). A run is
deterministic for its seed and splits. Grid networks that differ only in tau (or in the concrete
scale) share their key (common random numbers): each is still trained exactly as alone, the
comparison is not blurred by different draws, and the trainer draws the shared noise once, which
is most of an epoch's cost.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import tensorflow as tf

from training.artifact import Likelihood
from training.concrete import INITIAL_RATE, concrete_regularizers
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
from training.uci.publish import Job, conformal_through_saved_model, score_through_saved_model
from training.uci.report import INTERVAL_KEYS, PUBLISHED, mean_and_standard_error, rates_text, write_results
from training.uci.scoring import mc_scores
from training.uci.trainer import BATCH_SIZE, Weights, train_networks

_GRID, _FINAL = 0, 1  # phases, part of each network's key
DEFAULT_EPOCHS_MULTIPLIER = 100
"""The published table's epochs (4,000 for n_epochs 40); see docs/benchmarks.md."""

Log = Callable[[str], None]
Dropout = Literal["grid", "concrete"]


def _print(line: str) -> None:
    print(line, flush=True)


def _train_jobs(jobs: list[Job], epochs: int, hidden: int, outputs: int, beta: float, label: str, log: Log) -> Weights:
    """Train every job, grouped by row count (networks of a group are stacked); returns weights in job order."""
    result: list[Weights | None] = [None] * len(jobs)
    for n in sorted({len(job.y) for job in jobs}):
        members = [i for i, job in enumerate(jobs) if len(job.y) == n]
        group = [jobs[i] for i in members]
        concrete = group[0].concrete_scale is not None
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
            dropout_regularizers=np.array([job.dropout_regularizer for job in group]) if concrete else None,
            progress=progress,
        )
        for place, i in enumerate(members):
            result[i] = weights.take([place])
    return Weights.concat(result)


def _score_jobs(jobs: list[Job], weights: Weights, x_val: list[np.ndarray], y_val: list[np.ndarray], samples: int):
    """Validation (LL, RMSE) per job, networks grouped by validation row count."""
    ll, rmse = np.empty(len(jobs)), np.empty(len(jobs))
    for n in sorted({len(y) for y in y_val}):
        members = np.array([i for i, y in enumerate(y_val) if len(y) == n])
        group = [jobs[i] for i in members]
        part = weights.take(members)
        ll[members], rmse[members] = mc_scores(
            part,
            np.stack([job.scaling.inputs(x_val[i]) for i, job in zip(members, group, strict=True)]),
            np.stack([y_val[i] for i in members]),
            np.array([job.scaling.y_mean for job in group]),
            np.array([job.scaling.y_std for job in group]),
            part.rates() if part.p_logit is not None else np.array([job.rate for job in group]),
            np.array([1.0 if job.tau is None else job.tau for job in group]),
            np.stack([job.key for job in group]),
            samples,
        )
    return ll, rmse


def run(
    data: UciDataset,
    *,
    splits: Sequence[int] | None = None,
    epochs_multiplier: int = DEFAULT_EPOCHS_MULTIPLIER,
    samples: int = 10_000,
    seed: int = 0,
    likelihood: Likelihood = "homoscedastic",
    dropout: Dropout = "grid",
    concrete_scales: Sequence[float] = (1.0,),
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
    heteroscedastic, concrete = likelihood == "heteroscedastic", dropout == "concrete"
    taus: list[float | None] = [None] if heteroscedastic else list(data.tau_values)
    rates = [INITIAL_RATE] if concrete else data.dropout_rates
    scales: list[float | None] = list(concrete_scales) if concrete else [None]
    if concrete and (not concrete_scales or min(concrete_scales) <= 0):
        raise ValueError(f"concrete regularizer scales must be positive, got {list(concrete_scales)}")
    grid = [(p, scale, tau) for p in rates for scale in scales for tau in taus]
    hidden, outputs = data.n_hidden, 2 if heteroscedastic else 1
    timings: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    free = (("p", not concrete), ("scale", len(scales) > 1), ("tau", not heteroscedastic))
    axes = " x ".join(name for name, on in free if on)
    log(
        f"{data.name}: {len(data.y)} rows, {data.x.shape[1]} features, splits {splits}, {likelihood}, "
        f"{dropout} dropout, grid {len(grid)} ({axes or 'nothing to choose'}), {epochs} epochs, T = {samples}"
    )

    # Grid search: every (split, p, tau) on the split's first 80 %, scored on the last 20 %.
    jobs, x_val, y_val = [], [], []
    for k in splits:
        train = data.splits[k][0]
        n_fit = int(len(train) * (1 - VALIDATION_FRACTION))
        fit, val = train[:n_fit], train[n_fit:]
        scaling = Standardization.fit(data.x[fit], data.y[fit])
        for p, scale, tau in grid:
            key = network_key(seed, _GRID, k, rates.index(p))  # shared by the split's taus (and scales), see above
            network_rows = scaling.inputs(data.x[fit]), scaling.target(data.y[fit]), scaling
            jobs.append(_job(k, p, tau, *network_rows, key, scale, hidden))
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
    finals, chosen, best_of = [], {}, {}
    for k in splits:
        members = [i for i, job in enumerate(jobs) if job.split == k]
        best = best_of[k] = members[int(np.argmax(val_ll[members]))]
        chosen[k] = {
            "grid": [
                {
                    "p": jobs[i].rate,
                    **({"concrete_scale": jobs[i].concrete_scale} if concrete else {}),
                    "tau": jobs[i].tau,
                    "val_ll": float(val_ll[i]),
                    "val_rmse": float(val_rmse[i]),
                }
                for i in members
            ],
            "validation": {"log_likelihood": float(val_ll[best]), "rmse": float(val_rmse[best])},
        }
        train = data.splits[k][0]
        p, scale, tau = grid[members.index(best)]  # the grid point, not the job: a job's scale already has 1 / τ
        scaling = Standardization.fit(data.x[train], data.y[train])
        network_rows = scaling.inputs(data.x[train]), scaling.target(data.y[train]), scaling
        finals.append(_job(k, p, tau, *network_rows, network_key(seed, _FINAL, k, 0), scale, hidden))
    t0 = time.perf_counter()
    final_weights = _train_jobs(finals, epochs, hidden, outputs, beta, "retrain", log)
    timings["retrain_s"] = time.perf_counter() - t0

    # Test scores from the exported SavedModels.
    t0 = time.perf_counter()
    rows = []
    for place, job in enumerate(finals):
        mc_seed = int(np.random.SeedSequence([seed, job.split, 2]).generate_state(1, np.uint32)[0])
        test = score_through_saved_model(
            data, job, final_weights.take([place]), Path(repository), samples, mc_seed, chosen[job.split]["validation"]
        )
        best = best_of[job.split]
        test |= conformal_through_saved_model(
            data,
            jobs[best],
            weights.take([best]),
            Path(repository),
            samples,
            mc_seed,
            chosen[job.split]["validation"],
            (x_val[best], y_val[best]),
        )
        p = None if concrete else job.rate
        rows.append({"split": job.split, "p": p, "tau": job.tau, **chosen[job.split]["validation"], **test})
        rows[-1]["grid"] = chosen[job.split]["grid"]
        log(
            f"  split {job.split}: p={rates_text(rows[-1])}, tau={'-' if job.tau is None else f'{job.tau:g}'}, "
            f"rmse={test['rmse_mc']:.3f} "
            f"(deterministic {test['rmse_deterministic']:.3f}), ll={test['ll']:.3f}, 90 % coverage conformal "
            f"{test['calibrated_coverage_conformal']:.3f} / Gaussian {test['calibrated_coverage_gaussian']:.3f}"
        )
    timings["export_and_test_mc_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    timings["cpu_s"] = time.process_time() - cpu_started

    summary = {
        key: dict(zip(("mean", "standard_error"), mean_and_standard_error([r[key] for r in rows]), strict=True))
        for key in ("rmse_mc", "rmse_deterministic", "ll", *INTERVAL_KEYS)
    }
    if concrete:
        for layer, place in (("input", 0), ("hidden", 1)):
            mean, error = mean_and_standard_error([r["learned_rates"][place] for r in rows])
            summary[f"rate_{layer}"] = {"mean": mean, "standard_error": error}
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
            "dropout": dropout,
            "initial_rate": INITIAL_RATE if concrete else None,
            "concrete_scales": scales if concrete else None,
            "beta": beta if heteroscedastic else None,
            "hidden": hidden,
            "batch_size": BATCH_SIZE,
            "length_scale": LENGTH_SCALE,
            "validation_fraction": VALIDATION_FRACTION,
            "dropout_rates": data.dropout_rates if not concrete else None,
            "tau_values": data.tau_values if not heteroscedastic else None,
        },
        "summary": summary,
        "published": PUBLISHED.get(data.name),
        "timings": timings,
        "splits": rows,
        "machine": {"cpus": _cpus(), "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU"))},
    }


def _job(
    split: int,
    rate: float,
    tau: float | None,
    x: np.ndarray,
    y: np.ndarray,
    scaling: Standardization,
    key: np.ndarray,
    concrete_scale: float | None,
    hidden: int,
) -> Job:
    """A network on ``x``, ``y`` with its regularizers: the paper's weight decay, or the concrete factors.

    A homoscedastic concrete network's factors are divided by its precision in standardized units,
    ``tau * y_std²`` (``tau`` is in the target's units), see the module docstring.
    """
    if concrete_scale is not None:
        if tau is not None:
            concrete_scale /= tau * scaling.y_std**2
        weights = concrete_scale * concrete_regularizers(len(y))[0]
        return Job(split, rate, tau, x, y, scaling, (weights, weights), key, concrete_scale)
    return Job(split, rate, tau, x, y, scaling, weight_decay(rate, 1.0 if tau is None else tau, len(y), hidden), key)


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
    dropout: Dropout = "grid",
    concrete_scales: Sequence[float] = (1.0,),
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
        dropout=dropout,
        concrete_scales=concrete_scales,
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
