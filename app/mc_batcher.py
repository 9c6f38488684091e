"""MC batching: concurrent MC-dropout requests for one model version share one ``mc_dropout_segments`` call.

A job is one stretch of one request's samples: its instances, its seed, its first sample and how
many (a whole fixed-T request is one job from sample 0; ``samples: "auto"`` sends one job per round).
A call runs every job it holds as a segment of its own (``training.mc_dropout``): each segment's
masks depend only on its seed and sample index, and every row is computed on its own, so a job's
draws are bit for bit what it gets alone. Batching changes no answer; it only shares the call.

Jobs of any length share a call: a T = 100 request, a 10-sample round of an ``auto`` request and a
request of 32 instances go together, and the call costs about the rows they ask for (instances x
samples each), not the longest times the most. A call takes the oldest jobs while their rows fit in
``max_rows`` (a larger job runs alone, never split).

Up to ``concurrency`` calls run at once (the service's ``mc_threads``). A job that finds a call slot
free and no other job waiting runs at once, alone, so a lone request waits for nothing; jobs that
arrive while every slot is busy go together into the next call, which, like ``app.batcher``'s, waits
until a few turns of the event loop bring no new job (or the call is full). Each job's ``finish``
(summaries, the response body) runs in the worker thread right after the call, as an unbatched MC
request's does; an exception there reaches that job's caller only. A job may name a ``prepare``
(the version's ``app.summaries.Summarizer`` or ``Settler``): the jobs of a call with equal ones are prepared in one
go, of their segments and draws, each ``finish`` then gets its own share (per-request summaries cost more than the
draws).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from app.batcher import JobQueue
from training.signatures import Samples, Segment

Prepare = Callable[[list[Segment], list[Samples]], list[Any]]
"""Each job's share of a group of jobs, from their segments and draws."""


@dataclass(eq=False, slots=True)
class _Job:
    segment: Segment
    finish: Callable[[Any], Any]
    prepare: Prepare | None
    future: asyncio.Future
    size: int  # rows: instances x samples, what the job costs


def _finish_each(jobs: list[_Job], draws: list[Samples]) -> list[tuple[bool, Any]]:
    """Every job's ``finish`` of its own draws (or its share of their ``prepare``), each failure kept to the
    jobs it concerns."""
    prepared: list[tuple[bool, Any]] = [(True, drawn) for drawn in draws]
    groups: dict[Prepare, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.prepare is not None:
            groups.setdefault(job.prepare, []).append(i)
    for prepare, members in groups.items():
        try:
            values = prepare([jobs[i].segment for i in members], [draws[i] for i in members])
            shares = [(True, value) for value in values]
        except Exception as error:  # handed to these jobs' callers only
            shares = [(False, error)] * len(members)
        for i, share in zip(members, shares, strict=True):
            prepared[i] = share
    results: list[tuple[bool, Any]] = []
    for job, (ok, value) in zip(jobs, prepared, strict=True):
        if not ok:
            results.append((False, value))
            continue
        try:
            results.append((True, job.finish(value)))
        except Exception as error:  # handed to this job's caller only
            results.append((False, error))
    return results


class SegmentBatcher:
    def __init__(
        self,
        draw: Callable[[list[Segment]], list[Samples]],
        executor: Executor,
        max_rows: int,
        concurrency: int,
        observe: Callable[[int, int], None] = lambda jobs, rows: None,
    ) -> None:
        self._draw = draw
        self._executor = executor
        self._concurrency = concurrency
        self._observe = observe
        self._pending: JobQueue[_Job] = JobQueue(max_rows)
        self._workers = 0
        self._ready = 0  # workers between calls, about to take the pending jobs
        self._tasks: set[asyncio.Task] = set()  # the running workers (the loop keeps only weak references)

    async def __call__(
        self, segment: Segment, finish: Callable[[Any], Any] = lambda draws: draws, prepare: Prepare | None = None
    ) -> Any:
        """``finish`` of ``segment``'s draws, or of its share of ``prepare`` (run in the worker thread)."""
        loop = asyncio.get_running_loop()
        job = _Job(segment, finish, prepare, loop.create_future(), len(segment.inputs) * segment.samples)
        self._pending.push(job)
        if not self._ready and self._workers < self._concurrency:
            self._workers += 1
            self._ready += 1
            task = loop.create_task(self._work())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        called = False
        try:
            while self._pending:
                if called:
                    self._ready += 1
                    await self._pending.gather()
                called = True
                self._ready -= 1
                batch = self._pending.take()
                if not batch:
                    continue
                self._observe(len(batch), sum(job.size for job in batch))
                try:
                    results = await loop.run_in_executor(self._executor, self._call, batch)
                except Exception as error:  # the call itself failed: every job of it
                    results = [(False, error)] * len(batch)
                for job, (ok, value) in zip(batch, results, strict=True):
                    if job.future.done():
                        continue
                    if ok:
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(value)
        finally:
            self._workers -= 1
            if not called:
                self._ready -= 1

    def _call(self, batch: list[_Job]) -> list[tuple[bool, Any]]:
        return _finish_each(batch, self._draw([job.segment for job in batch]))
