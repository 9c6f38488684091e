"""Summaries of many requests at once (MC batching): an instance's summary and Monte-Carlo errors are the same
bits computed alone or beside other requests' instances, whatever T, class count or batch size."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import numpy as np
import pytest

from app.loading import load_version
from app.mc_batcher import SegmentBatcher
from app.summaries import Settler, Summarizer, summarize
from training import adaptive, signatures
from training.signatures import Segment
from training.uncertainty import sample_mean, sample_std, summarize_classification, summarize_regression


def assert_same_bits(alone, together, label: str) -> None:
    """Two summaries (or arrays) with byte-identical values, field by field."""
    if isinstance(alone, np.ndarray) or not hasattr(alone, "__dataclass_fields__"):
        assert np.asarray(alone).tobytes() == np.asarray(together).tobytes(), label
        return
    for field in fields(alone):
        a, b = getattr(alone, field.name), getattr(together, field.name)
        assert np.asarray(a).shape == np.asarray(b).shape, (label, field.name)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (label, field.name)


def probabilities(rng: np.random.Generator, t: int, n: int, k: int) -> np.ndarray:
    return rng.dirichlet(np.full(k, 0.3), size=(t, n)).astype(np.float32)


@pytest.mark.parametrize("t", [1, 2, 7, 9, 100, 129, 1000])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_each_instance_is_the_same_bits_alone_as_in_a_batch(t, k):
    rng = np.random.default_rng(t * 100 + k)
    together = rng.normal(size=(t, 33, k)) if k == 1 else probabilities(rng, t, 33, k)
    assert sample_mean(together).shape == (33, k) and np.all(sample_std(together) >= 0)
    np.testing.assert_allclose(sample_mean(together), together.astype(np.float64).mean(axis=0), rtol=1e-12)
    for n in (1, 2, 5, 33):
        batch = together[:, :n]
        for i in range(n):
            alone = batch[:, i : i + 1]
            assert_same_bits(sample_mean(alone), sample_mean(batch)[i : i + 1], f"mean t={t} n={n}")
            assert_same_bits(sample_std(alone), sample_std(batch)[i : i + 1], f"std t={t} n={n}")
            if k == 1:
                whole = summarize_regression(batch, 4.0)
                part = summarize_regression(alone, 4.0)
                errors = adaptive.regression_error(batch, 4.0), adaptive.regression_error(alone, 4.0)
            else:
                whole, part = summarize_classification(batch), summarize_classification(alone)
                errors = adaptive.classification_error(batch, 0.4), adaptive.classification_error(alone, 0.4)
            assert_same_bits(part, type(whole)(**{f.name: _row(getattr(whole, f.name), i) for f in fields(whole)}), "")
            assert_same_bits(errors[1], errors[0][i : i + 1], f"error t={t} n={n}")


def _row(value, i: int):
    return value[i : i + 1] if isinstance(value, np.ndarray) else value


@pytest.fixture(scope="module")
def served(tiny_classifier_dir):
    return load_version("tiny", tiny_classifier_dir)


def requests(digit_rows: np.ndarray) -> list[Segment]:
    """Nine requests: 1-3 instances each, their own seeds, T of 10, 100 or 37 (three of each)."""
    return [Segment(digit_rows[i : i + 1 + i % 3], 50 + i, 0, (10, 100, 37)[i % 3]) for i in range(9)]


def test_a_call_summarized_together_gives_each_request_its_summary_alone(served, digit_rows):
    segments = requests(digit_rows)
    draws = signatures.segment_draws(served.saved_model.signatures["mc_dropout_segments"], segments)
    together = Summarizer(served)(draws)
    settled = Settler(served)(draws)
    error = adaptive.error_function(served.task, served.tau, served.predictive_temperature)
    assert len(together) == len(settled) == 9
    for drawn, summary, (same, summary_too, errors) in zip(draws, together, settled, strict=True):
        alone = summarize(served, drawn)
        assert summary.mean.shape == (drawn.outputs.shape[1], 10)
        assert_same_bits(alone, summary, "summary")
        assert_same_bits(alone, summary_too, "settler's summary")
        assert same is drawn
        assert_same_bits(error(drawn), errors, "errors")
    assert Summarizer(served) == Summarizer(served) and Summarizer(served) != Summarizer(
        load_version("tiny", served.path)
    )


def test_jobs_with_one_prepare_share_one_call_of_it_and_its_failure_is_theirs_only(served, digit_rows):
    prepared: list[int] = []

    def draw(segments: list[Segment]) -> list[signatures.Samples]:
        return signatures.segment_draws(served.saved_model.signatures["mc_dropout_segments"], segments)

    def count(draws: list[signatures.Samples]) -> list[int]:
        prepared.append(len(draws))
        return [d.outputs.shape[0] for d in draws]

    def fail(draws: list[signatures.Samples]) -> list:
        raise ValueError("prepare failed")

    segments = requests(digit_rows)
    plans = [count, count, fail, None] * 2 + [count]

    async def main() -> list:
        batcher = SegmentBatcher(draw, pool, max_rows=100_000, concurrency=1)
        blocker = asyncio.ensure_future(batcher(Segment(digit_rows[:1], 1, 0, 5000)))  # the next call gathers all 9
        await asyncio.sleep(0)
        jobs = [batcher(s, lambda value: value, plan) for s, plan in zip(segments, plans, strict=True)]
        return [*(await asyncio.gather(*jobs, return_exceptions=True)), await blocker]

    with ThreadPoolExecutor(1) as pool:
        *results, _ = asyncio.run(main())
    for segment, plan, result in zip(segments, plans, results, strict=True):
        if plan is count:
            assert result == segment.samples
        elif plan is fail:
            assert isinstance(result, ValueError) and str(result) == "prepare failed"
        else:
            assert isinstance(result, signatures.Samples) and result.outputs.shape[0] == segment.samples
    assert prepared == [5], prepared  # the five `count` jobs of one call, prepared in one go
