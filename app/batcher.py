"""Adaptive batching: concurrent inference-mode requests for one model version share a call.

A request that finds the batcher idle runs at once, alone. Requests that arrive while a call
is running queue up and go together as the next call, up to ``max_rows`` rows (a request
larger than that runs on its own, never split). Each caller gets its own rows of the outputs back.

Under load the event loop, not the model, is the bottleneck: every call costs the loop's thread
about as much Python as reading two requests, so a call started the moment the previous one
ends, with the few requests read meanwhile, wastes it. After a call, the next one therefore
waits while requests keep joining: until ``QUIET_PASSES`` turns of the event loop in a row add
none, or the batch is full. Each turn that adds a request does useful work, so the wait is bounded
by ``max_rows`` such turns. ``timeout`` may instead hold every call back a fixed time.

Callers have validated their rows before they queue, so one call fails only for a reason its
whole batch shares. A caller that goes away (client disconnect) leaves its slot unused; its
batch-mates are not affected.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

QUIET_PASSES = 3
"""Event-loop turns without a new request after which a waiting call starts (a request takes two
turns from the socket to the queue: one reads it, one runs its handler)."""


class Job(Protocol):
    size: int  # rows: what the job adds to a call
    future: asyncio.Future


J = TypeVar("J", bound=Job)


class JobQueue(Generic[J]):
    """Jobs waiting for a call, oldest first, with the rows they hold: what ``Batcher`` and ``app.mc_batcher``'s
    ``SegmentBatcher`` take their calls from."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._jobs: deque[J] = deque()
        self.rows = 0
        """Rows waiting, callers gone or not: counted as they come and go, not summed per loop turn."""

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def push(self, job: J) -> None:
        self._jobs.append(job)
        self.rows += job.size

    @property
    def full(self) -> bool:
        return self.rows >= self.max_rows

    async def gather(self) -> None:
        """Wait while jobs keep joining: until ``QUIET_PASSES`` event-loop turns in a row add none, or it is full."""
        quiet = 0
        while quiet < QUIET_PASSES and not self.full:
            queued = len(self._jobs)
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self._jobs) == queued else 0

    def take(self) -> list[J]:
        """The oldest live jobs that fit in one call (at least one, whatever its size)."""
        batch: list[J] = []
        rows = 0
        while self._jobs:
            job = self._jobs[0]
            if batch and not job.future.done() and rows + job.size > self.max_rows:
                break
            self._jobs.popleft()
            self.rows -= job.size
            if not job.future.done():  # else its caller went away
                batch.append(job)
                rows += job.size
        return batch


@dataclass(eq=False, slots=True)
class _Job:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    queued_at: float
    size: int


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        max_rows: int,
        timeout: float = 0.0,
        observe: Callable[[int, float], None] = lambda rows, waited: None,
    ) -> None:
        self._run = run
        self._executor = executor
        self._timeout = timeout
        self._observe = observe
        self._pending: JobQueue[_Job] = JobQueue(max_rows)
        self._draining: asyncio.Task | None = None

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        job = _Job(rows, loop.create_future(), loop.time(), len(rows))
        self._pending.push(job)
        if self._draining is None:
            self._draining = loop.create_task(self._drain())
        return await job.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        called = False
        try:
            while self._pending:
                if self._timeout and not self._pending.full:
                    await asyncio.sleep(self._timeout)
                elif called:
                    await self._pending.gather()
                called = True
                batch = self._pending.take()
                if not batch:
                    continue
                started = loop.time()
                self._observe(sum(job.size for job in batch), started - batch[0].queued_at)
                inputs = batch[0].rows if len(batch) == 1 else np.concatenate([job.rows for job in batch])
                try:
                    outputs = await loop.run_in_executor(self._executor, self._run, inputs)
                except Exception as error:  # delivered to every caller of this batch
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(error)
                    continue
                start = 0
                for job in batch:
                    stop = start + len(job.rows)
                    if not job.future.done():
                        job.future.set_result(outputs[start:stop])
                    start = stop
        finally:
            self._draining = None
