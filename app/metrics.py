"""Prometheus metrics at ``GET /metrics``: traffic, latency, models, batching, and live uncertainty.

Labels are route templates and loaded model names/versions only, never raw paths or names a client
typed, so the number of series stays bounded. The uncertainty histograms (entropy and mutual
information for classifiers, epistemic and total std for regressors, top-class probability from
``/predict``) describe live traffic per model version: a shift in them is an early sign of data
drift that plain request metrics do not show.

Several workers: prometheus-client's multiprocess mode. ``prepare_multiprocess`` must run in the
process that launches uvicorn, before the workers start (they read ``PROMETHEUS_MULTIPROC_DIR``
when they import prometheus_client). It empties the directory so counters restart at zero.
Each worker then writes its values to files there and whichever worker answers ``/metrics``
merges them; process metrics (CPU, memory, fds) are read from ``/proc`` for every live worker and
labelled with its pid.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

from training.uncertainty import ClassificationSummary, RegressionSummary

if TYPE_CHECKING:
    from app.context import RequestRecord

disable_created_metrics()  # the *_created series double the exposition and no dashboard reads them

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_NATS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
_STD = tuple(m * 10.0**e for e in range(-3, 4) for m in (1, 3))
_PROBABILITY = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)

REQUESTS = Counter("dropout_serve_requests", "Requests answered.", ["route", "method", "model", "version", "status"])
LATENCY = Histogram(
    "dropout_serve_request_duration_seconds",
    "Time from request to the end of the response.",
    ["route", "method", "model", "version"],
    buckets=_LATENCY,
)
IN_FLIGHT = Gauge("dropout_serve_requests_in_flight", "Requests being served now.", multiprocess_mode="livesum")
INSTANCES = Histogram(
    "dropout_serve_request_instances",
    "Instances per request.",
    ["route", "model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
MC_SAMPLES = Histogram(
    "dropout_serve_mc_samples",
    "Monte-Carlo samples T per MC request.",
    ["model", "version"],
    buckets=(1, 10, 30, 100, 300, 1000, 3000, 10000),
)
MODEL_LOADED = Gauge(
    "dropout_serve_model_loaded",
    "1 while a model version is loaded.",
    ["model", "version"],
    multiprocess_mode="livemax",
)
MODEL_LOAD_SECONDS = Histogram(
    "dropout_serve_model_load_seconds",
    "Time to load and warm up a model version.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
MODEL_LOAD_FAILURES = Counter("dropout_serve_model_load_failures", "Model versions that failed to load.", ["model"])
BATCH_ROWS = Histogram(
    "dropout_serve_batch_rows",
    "Rows per model call after dynamic batching.",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_WAIT = Histogram(
    "dropout_serve_batch_queue_wait_seconds",
    "Time a request waited for its batch to run.",
    ["model", "version"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
MC_BATCH_REQUESTS = Histogram(
    "dropout_serve_mc_batch_requests",
    "MC stretches (requests, or rounds of samples auto) per mc_dropout_segments call.",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
PREDICTIVE_ENTROPY = Histogram(
    "dropout_serve_mc_predictive_entropy_nats",
    "Predictive entropy (total uncertainty) of each instance served by the MC endpoint.",
    ["model", "version"],
    buckets=_NATS,
)
MUTUAL_INFORMATION = Histogram(
    "dropout_serve_mc_mutual_information_nats",
    "Mutual information (BALD, epistemic uncertainty) of each instance served by the MC endpoint.",
    ["model", "version"],
    buckets=_NATS,
)
EPISTEMIC_STD = Histogram(
    "dropout_serve_mc_epistemic_std",
    "Epistemic standard deviation of each regression output served by the MC endpoint (target units).",
    ["model", "version"],
    buckets=_STD,
)
TOTAL_STD = Histogram(
    "dropout_serve_mc_total_std",
    "Total predictive standard deviation of each regression output served by the MC endpoint (target units).",
    ["model", "version"],
    buckets=_STD,
)
TOP_PROBABILITY = Histogram(
    "dropout_serve_predict_top_probability",
    "Probability of the predicted class of each instance served by /predict.",
    ["model", "version"],
    buckets=_PROBABILITY,
)


@lru_cache(maxsize=4096)
def _child(metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
    """``metric.labels(*labels)``, remembered: children are never removed, and the lookup (a lock and
    a label check) costs more than the observation on every request."""
    return metric.labels(*labels)


def request_started() -> None:
    IN_FLIGHT.inc()


def request_finished(record: RequestRecord) -> None:
    IN_FLIGHT.dec()
    version = "" if record.version is None else str(record.version)
    _child(REQUESTS, record.route, record.method, record.model, version, str(record.status)).inc()
    _observe(_child(LATENCY, record.route, record.method, record.model, version), record.seconds)
    if record.instances is not None and record.model:
        _observe(_child(INSTANCES, record.route, record.model), record.instances)
    if record.samples is not None and record.model and 200 <= record.status < 300:
        _observe(_child(MC_SAMPLES, record.model, version), record.samples)


# Every request observes several histograms, and prometheus-client's ``observe`` finds the bucket
# by a Python loop over the bounds. These two do what it does (add to the sum, count in the first
# bucket whose bound is >= the value) through the same value objects, by bisection, and a whole
# array of values at once; tests/test_operations.py checks them against ``observe``.


def _observe(histogram: Histogram, value: float) -> None:
    histogram._sum.inc(value)
    histogram._buckets[bisect_left(histogram._upper_bounds, value)].inc(1)


_FEW = 8
"""Up to this many values are observed one by one: NumPy's per-call costs exceed the loop's (an MC request of one
instance observes two histograms)."""


def _observe_all(histogram: Histogram, values: np.ndarray) -> None:
    values = np.ravel(values).astype(np.float64)
    if values.size <= _FEW:
        for value in values.tolist():
            if value == value:  # NaN only adds to the sum, as observe() does
                _observe(histogram, value)
            else:
                histogram._sum.inc(value)
        return
    histogram._sum.inc(float(values.sum()))
    counted = values[~np.isnan(values)]  # observe() counts NaN in no bucket (it only adds to the sum)
    counts = np.bincount(np.searchsorted(histogram._upper_bounds, counted, side="left"), minlength=1)
    for bucket in np.flatnonzero(counts).tolist():
        histogram._buckets[bucket].inc(int(counts[bucket]))


def observe_mc(model: str, version: int, task: str | None, summary: ClassificationSummary | RegressionSummary) -> None:
    """Uncertainty of each instance an MC request served (models without a task are skipped)."""
    labels = (model, str(version))
    if task == "classification" and isinstance(summary, ClassificationSummary):
        _observe_all(_child(PREDICTIVE_ENTROPY, *labels), summary.predictive_entropy)
        _observe_all(_child(MUTUAL_INFORMATION, *labels), summary.mutual_information)
    elif task == "regression" and isinstance(summary, RegressionSummary):
        _observe_all(_child(EPISTEMIC_STD, *labels), summary.epistemic_std)
        _observe_all(_child(TOTAL_STD, *labels), summary.total_std)


def observe_predict(model: str, version: int, task: str | None, outputs: np.ndarray) -> None:
    """Top-class probability of each instance a classifier answered on /predict (outputs [N, K])."""
    if task == "classification":
        _observe_all(_child(TOP_PROBABILITY, model, str(version)), outputs.max(axis=-1))


def observe_batch(name: str, version: int, rows: int, queue_wait_seconds: float) -> None:
    """One model call of the batcher: how many rows it ran, how long its oldest request waited."""
    _observe(_child(BATCH_ROWS, name, str(version)), rows)
    _observe(_child(QUEUE_WAIT, name, str(version)), queue_wait_seconds)


def observe_mc_batch(name: str, version: int, jobs: int, rows: int) -> None:
    """One MC call shared by ``jobs`` stretches of samples (``rows``: their instances x samples)."""
    _observe(_child(MC_BATCH_REQUESTS, name, str(version)), jobs)


def model_loaded(name: str, version: int, seconds: float) -> None:
    MODEL_LOADED.labels(name, str(version)).set(1)
    MODEL_LOAD_SECONDS.labels(name).observe(seconds)


def model_load_failed(name: str, version: int) -> None:
    MODEL_LOADED.labels(name, str(version)).set(0)
    MODEL_LOAD_FAILURES.labels(name).inc()


def model_unloaded(name: str, version: int) -> None:
    MODEL_LOADED.labels(name, str(version)).set(0)


def prepare_multiprocess(workers: int) -> Path | None:
    """In the launcher, before uvicorn starts ``workers`` > 1 processes: a fresh multiprocess directory.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` if set (emptied), else a new temporary directory; returns it.
    """
    if workers <= 1:
        return None
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="dropout-serve-metrics-"))
        os.environ[MULTIPROC_ENV] = str(path)
    return path


class _WorkerProcesses:
    """CPU, memory and fds of every live worker, labelled by pid (multiprocess mode only)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _pids(self) -> list[int]:
        pids = {int(m.group(1)) for f in os.listdir(self.directory) if (m := re.search(r"_(\d+)\.db$", f))}
        return sorted(pid for pid in pids if os.path.exists(f"/proc/{pid}"))

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in self._pids():
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        return families.values()


def _registry() -> CollectorRegistry:
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    registry.register(_WorkerProcesses(directory))
    return registry


if os.environ.get(MULTIPROC_ENV):
    atexit.register(multiprocess.mark_process_dead, os.getpid())

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """The Prometheus exposition (text format 0.0.4)."""
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)
