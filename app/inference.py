"""The one place that runs models: request rows in, signature outputs back, off the event loop.

Every protocol door goes through here. Inference-mode calls of one model version are batched
(``app.batcher``); MC-dropout calls run in their own small pool, so a long MC call never
holds up another model's predictions. Rows are checked before they run, so a bad request
fails alone, with a message that names the spot.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np

from app import metrics
from app.batcher import Batcher
from app.errors import ApiError
from app.loading import ServedModel
from app.settings import Settings
from training import signatures
from training.uncertainty import (
    ClassificationSummary,
    RegressionSummary,
    summarize_classification,
    summarize_regression,
)

_NUMBER_TYPES = (int, float)
R = TypeVar("R")


def to_array(instances: list[Any], shape: tuple[int, ...], may_hold_booleans: bool = True) -> np.ndarray:
    """A float32 batch ``[N, *shape]``, or a 422 naming the first bad spot.

    Well-formed numbers convert in one vectorised step. NumPy reads ``true`` as 1, so a caller
    whose raw body has no ``true``/``false`` says so with ``may_hold_booleans=False``; otherwise
    (and for anything NumPy does not turn into a numeric array of the right shape) every value
    is checked one by one, which also builds the error message.
    """
    if not may_hold_booleans:
        try:
            batch = np.array(instances)
        except ValueError:  # ragged
            batch = None
        if batch is not None and batch.dtype.kind in "iuf" and batch.shape[1:] == shape and len(instances):
            return _finite_float32(batch)
    for index, instance in enumerate(instances):
        _check(instance, shape, f"instances[{index}]")
    return _finite_float32(np.asarray(instances, dtype=np.float64))


def _finite_float32(values: np.ndarray) -> np.ndarray:
    batch = values.astype(np.float32)
    if values.dtype.kind in "iu":  # every int64 is finite in float32 (2^63 < float32's largest)
        return batch
    if not np.isfinite(batch).all():
        where = np.argwhere(~np.isfinite(batch))[0]
        position = "".join(f"[{i}]" for i in where)
        if np.isfinite(values[tuple(where)]):
            raise ApiError(422, f"instances{position}: value is outside the float32 range")
        raise ApiError(422, f"instances{position}: NaN and infinity are not allowed")
    return batch


def _check(value: Any, shape: tuple[int, ...], where: str) -> None:
    if not shape:
        if type(value) not in _NUMBER_TYPES:
            raise ApiError(422, f"{where}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ApiError(422, f"{where}: NaN and infinity are not allowed")
        return
    if not isinstance(value, list) or len(value) != shape[0]:
        got = f"a list of {len(value)}" if isinstance(value, list) else _describe(value)
        raise ApiError(422, f"{where}: expected a list of {shape[0]} (instance shape {list(shape)}), got {got}")
    for index, item in enumerate(value):
        _check(item, shape[1:], f"{where}[{index}]")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_instances(count: int, settings: Settings) -> None:
    if count > settings.max_instances:
        raise ApiError(
            422,
            f"instances: {count} given, at most {settings.max_instances} per request (DROPOUT_SERVE_MAX_INSTANCES)",
        )


def check_mc(model: ServedModel, count: int, samples: int | None, settings: Settings) -> int:
    """T for an MC request of ``count`` instances, or a 422 saying which limit it breaks."""
    samples = samples or settings.default_samples
    if samples > settings.max_samples:
        raise ApiError(422, f"samples: {samples} asked, at most {settings.max_samples} (DROPOUT_SERVE_MAX_SAMPLES)")
    if samples * count > settings.max_mc_rows:
        raise ApiError(
            422,
            f"samples x instances = {samples * count}, at most {settings.max_mc_rows} per request "
            "(DROPOUT_SERVE_MAX_MC_ROWS); send fewer instances or samples",
        )
    if model.mc_dropout is None:
        raise ApiError(
            422,
            f"model {model.name!r} version {model.version} has no mc_dropout signature "
            "(it was not exported with dropout layers); use inference-mode prediction",
        )
    return samples


async def predict(model: ServedModel, batch: np.ndarray) -> np.ndarray:
    """Inference-mode outputs ``[N, ...]`` (dropout off), batched with concurrent callers."""
    return await model.run_predict(batch)


def _predict_observed(model: ServedModel, batch: np.ndarray) -> np.ndarray:
    """One model call, its outputs observed for the metrics once per call, not once per request."""
    outputs = model.predict(batch)
    metrics.observe_predict(model.name, model.version, model.task, outputs)
    return outputs


async def sample(
    model: ServedModel,
    batch: np.ndarray,
    samples: int,
    seed: int,
    finish: Callable[[signatures.Samples], R] = lambda draws: draws.outputs,
) -> R:
    """``finish`` of the ``samples`` MC-dropout draws (``outputs [T, N, ...]``, and ``variance`` for a
    heteroscedastic model); the same seed gives the same samples.

    ``finish`` (summaries, the response body) runs in the same worker thread as the signature:
    at the largest T x N it takes a fraction of a second, and one hop off the event loop is
    cheaper than two.
    """
    return await model.run_sample(batch, samples, seed, finish)


def summarize(model: ServedModel, sampled: signatures.Samples) -> ClassificationSummary | RegressionSummary | None:
    """The per-instance MC summaries of ``sampled`` (None for a model without a task), observed for
    the uncertainty histograms here, so that every door's MC traffic is counted the same way."""
    draws = sampled.outputs.astype(np.float64)
    summary: ClassificationSummary | RegressionSummary
    if model.task == "classification":
        summary = summarize_classification(draws, sampled.predictive)  # predictive: calibrated, if the model is
    elif model.task == "regression":
        summary = summarize_regression(draws, model.tau, sampled.variance)  # variance: heteroscedastic noise
    else:
        return None
    metrics.observe_mc(model.name, model.version, model.task, summary)
    return summary


def _sample_then(
    model: ServedModel, batch: np.ndarray, samples: int, seed: int, finish: Callable[[signatures.Samples], R]
) -> R:
    return finish(model.sample(batch, samples, seed))


class Engine:
    """The thread pools models run in, and how each loaded version is wired to them."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._predict_pool = ThreadPoolExecutor(4, thread_name_prefix="predict")  # unbatched calls overlap
        self._mc_pool = ThreadPoolExecutor(settings.mc_threads, thread_name_prefix="mc-dropout")

    def prepare(self, model: ServedModel) -> None:
        """Give a freshly loaded version its batcher (or a plain call, with batching off)."""
        if self._settings.max_batch_size > 1:
            model.run_predict = Batcher(
                partial(_predict_observed, model),
                self._predict_pool,
                self._settings.max_batch_size,
                self._settings.batch_timeout_ms / 1000,
                observe=partial(metrics.observe_batch, model.name, model.version),
            )
        else:
            model.run_predict = partial(self._in_pool, self._predict_pool, _predict_observed, model)
        model.run_sample = partial(self._in_pool, self._mc_pool, _sample_then, model)

    @staticmethod
    async def _in_pool(pool: ThreadPoolExecutor, function, *args) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    def close(self) -> None:
        self._predict_pool.shutdown(wait=False, cancel_futures=True)
        self._mc_pool.shutdown(wait=False, cancel_futures=True)
