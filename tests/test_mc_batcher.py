"""MC batching in-process: concurrent stretches share mc_dropout_segments calls and each gets its own draws."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf

from app.mc_batcher import SegmentBatcher
from training import signatures
from training.signatures import Segment


@pytest.fixture(scope="module")
def segments_signature(tiny_classifier_dir):
    return tf.saved_model.load(str(tiny_classifier_dir)).signatures["mc_dropout_segments"]


def jobs(digit_rows: np.ndarray) -> list[Segment]:
    """32 stretches: 1-3 instances, their own seeds, first samples and lengths (10 to 227 samples)."""
    return [Segment(digit_rows[i % 13 : i % 13 + 1 + i % 3], 1000 + i, i % 5, 10 + 7 * i) for i in range(32)]


def run(batcher: SegmentBatcher, segments: list[Segment], finish=lambda draws: draws) -> list:
    async def main() -> list:
        return await asyncio.gather(*(batcher(s, finish) for s in segments), return_exceptions=True)

    return asyncio.run(main())


def test_concurrent_jobs_share_calls_and_each_gets_the_draws_it_gets_alone(segments_signature, digit_rows):
    calls: list[tuple[int, int]] = []

    def draw(segments: list[Segment]) -> list[signatures.Samples]:
        calls.append((len(segments), sum(len(s.inputs) * s.samples for s in segments)))
        return signatures.segment_draws(segments_signature, segments)

    segments = jobs(digit_rows)
    with ThreadPoolExecutor(2) as pool:
        results = run(SegmentBatcher(draw, pool, max_rows=1500, concurrency=2), segments)
    for segment, got in zip(segments, results, strict=True):
        assert isinstance(got, signatures.Samples), got
        alone = signatures.segment_draws(segments_signature, [segment])[0]
        assert got.outputs.shape == (segment.samples, len(segment.inputs), 10)
        assert got.outputs.tobytes() == alone.outputs.tobytes()
    assert sum(jobs for jobs, _ in calls) == 32 and max(jobs for jobs, _ in calls) > 1, calls
    assert all(rows <= 1500 or jobs == 1 for jobs, rows in calls), calls


def test_a_failing_finish_fails_its_own_job_only(segments_signature, digit_rows):
    def finish(draws: signatures.Samples):
        if draws.outputs.shape[0] == 31:  # the fourth job: 10 + 7 * 3 samples
            raise ValueError("this one")
        return draws.outputs.shape

    segments = jobs(digit_rows)[:8]
    with ThreadPoolExecutor(1) as pool:
        draw = lambda batch: signatures.segment_draws(segments_signature, batch)  # noqa: E731
        results = run(SegmentBatcher(draw, pool, max_rows=100_000, concurrency=1), segments, finish)
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [
        (s.samples, len(s.inputs), 10) for i, s in enumerate(segments) if i != 3
    ]
