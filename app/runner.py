"""How a loaded version runs off the event loop: its batcher and the thread pools, one object per version.

``Runtime`` owns the pools every version shares; ``Runtime.runner`` gives a version, while it is being
loaded, the ``Runner`` it keeps for life. Inference-mode calls of one version are batched
(``app.batcher``); MC-dropout calls run in their own small pool, so a long MC call never holds up
another model's predictions. A version is therefore complete, runner included, when the registry
first hands it out: nothing is filled in afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np

from app import metrics
from app.batcher import Batcher
from app.mc_batcher import Prepare, SegmentBatcher
from app.settings import Settings
from training import signatures
from training.draws import Segment, continued

R = TypeVar("R")
Predict = Callable[[np.ndarray], np.ndarray]
Sample = Callable[[np.ndarray, int, int], signatures.Samples]


class Runner:
    """One version's calls: ``predict`` batched with concurrent callers, ``sample`` in the MC pool, and
    ``draw`` (stretches of MC samples) batched across requests when the artifact has ``mc_dropout_segments``."""

    __slots__ = ("_batched", "_mc_pool", "_predict", "_predict_pool", "_sample", "_segments")

    def __init__(
        self,
        predict: Predict,
        sample: Sample,
        predict_pool: Executor | None,
        mc_pool: Executor | None,
        batcher: Batcher | None,
        segments: SegmentBatcher | None = None,
    ) -> None:
        self._predict, self._sample = predict, sample
        self._predict_pool, self._mc_pool = predict_pool, mc_pool
        self._batched = batcher
        self._segments = segments

    @property
    def batches_mc(self) -> bool:
        """Whether MC requests share calls (the artifact has ``mc_dropout_segments``)."""
        return self._segments is not None

    async def draw(self, segment: Segment, finish: Callable[[Any], R], prepare: Prepare | None = None) -> R:
        """``finish`` of one stretch of MC draws (``segment``), or of ``prepare([segment], [draws])[0]``, in the MC
        worker thread.

        Batched with concurrent MC requests of this version when the artifact has ``mc_dropout_segments``
        (``app.mc_batcher``, which prepares the jobs of a call together); otherwise alone, by ``mc_dropout``
        from sample 0, keeping the stretch. Either way the draws are bit for bit those of ``mc_dropout``
        with the segment's seed.
        """
        if self._segments is not None:
            return await self._segments(segment, finish, prepare)
        call = partial(_stretch_then, self._sample, segment, finish, prepare)
        return await asyncio.get_running_loop().run_in_executor(self._mc_pool, call)

    async def in_mc_pool(self, call: Callable[[], R]) -> R:
        """``call()`` in the MC worker pool (summaries and encoding of an answer drawn in several calls)."""
        return await asyncio.get_running_loop().run_in_executor(self._mc_pool, call)

    async def predict(self, batch: np.ndarray) -> np.ndarray:
        """Inference-mode outputs ``[N, ...]`` (dropout off), batched with concurrent callers."""
        if self._batched is not None:
            return await self._batched(batch)
        return await asyncio.get_running_loop().run_in_executor(self._predict_pool, self._predict, batch)

    async def sample(self, batch: np.ndarray, samples: int, seed: int, finish: Callable[[signatures.Samples], R]) -> R:
        """``finish`` of the MC-dropout draws; the same seed gives the same draws.

        ``finish`` (summaries, the response body) runs in the same worker thread as the signature:
        at the largest T x N it takes a fraction of a second, and one hop off the event loop is
        cheaper than two.
        """
        call = partial(_sample_then, self._sample, batch, samples, seed, finish)
        return await asyncio.get_running_loop().run_in_executor(self._mc_pool, call)


def _sample_then(sample: Sample, batch: np.ndarray, samples: int, seed: int, finish: Callable) -> object:
    return finish(sample(batch, samples, seed))


def _stretch_then(sample: Sample, segment: Segment, finish: Callable, prepare: Prepare | None) -> object:
    draws = sample(segment.inputs, segment.first + segment.samples, segment.seed)
    kept = continued(segment, signatures.Samples(*(None if a is None else a[segment.first :] for a in draws[:2])))
    return finish(kept if prepare is None else prepare([segment], [kept])[0])


def _predict_observed(predict: Predict, name: str, version: int, task: str | None, batch: np.ndarray) -> np.ndarray:
    """One model call, its outputs observed for the metrics once per call, not once per request."""
    outputs = predict(batch)
    metrics.observe_predict(name, version, task, outputs)
    return outputs


class Runtime:
    """The thread pools models run in; ``pooled=False`` (a loader without a server): asyncio's default pool."""

    def __init__(self, settings: Settings, pooled: bool = True) -> None:
        self._settings = settings
        self._predict_pool = ThreadPoolExecutor(4, thread_name_prefix="predict") if pooled else None
        self._mc_pool = ThreadPoolExecutor(settings.mc_threads, thread_name_prefix="mc-dropout") if pooled else None

    def runner(
        self,
        name: str,
        version: int,
        task: str | None,
        predict: Predict,
        sample: Sample,
        draw_segments: Callable[[list[Segment]], list[signatures.Samples]] | None = None,
    ) -> Runner:
        """``draw_segments``: the version's ``mc_dropout_segments`` client, if it has the signature."""
        observed = partial(_predict_observed, predict, name, version, task)
        batcher = None
        if self._settings.max_batch_size > 1:
            batcher = Batcher(
                observed,
                self._predict_pool,
                self._settings.max_batch_size,
                self._settings.batch_timeout_ms / 1000,
                observe=partial(metrics.observe_batch, name, version),
            )
        segments = None
        if draw_segments is not None:
            rows, calls = self._settings.mc_batch_rows, self._settings.mc_threads
            observe = partial(metrics.observe_mc_batch, name, version)
            segments = SegmentBatcher(draw_segments, self._mc_pool, rows, calls, observe)
        return Runner(observed, sample, self._predict_pool, self._mc_pool, batcher, segments)

    def close(self) -> None:
        for pool in (self._predict_pool, self._mc_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
