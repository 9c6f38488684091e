"""Summaries of many requests at once (MC batching): an instance's summary and Monte-Carlo errors are the same
bits computed alone or beside other requests' instances, whatever T, class count or batch size."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace

import numpy as np
import pytest

from app.loading import ServedModel, load_version
from app.mc_batcher import SegmentBatcher
from app.summaries import Settler, Summarizer, conformal_answer, summarize
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
    together = Summarizer(served)(segments, draws)
    settled = Settler(served)(segments, draws)
    error = adaptive.error_function(served.task, served.tau, served.predictive_temperature)
    assert len(together) == len(settled) == 9
    for drawn, (summary, conformal), (same, summary_too, errors, conformal_too) in zip(
        draws, together, settled, strict=True
    ):
        alone = summarize(served, drawn)
        assert summary.mean.shape == (drawn.outputs.shape[1], 10)
        assert conformal is None and conformal_too is None  # the tiny model has no calibration
        assert_same_bits(alone, summary, "summary")
        assert_same_bits(alone, summary_too, "settler's summary")
        assert same is drawn
        assert_same_bits(error(drawn), errors, "errors")
    assert Summarizer(served) == Summarizer(served) and Summarizer(served) != Summarizer(
        load_version("tiny", served.path)
    )
    assert Summarizer(served, 0.1) != Summarizer(served) != Summarizer(served, None, 0.2)
    assert Settler(served, 0.1) != Settler(served) == Settler(served)


@pytest.fixture(scope="module")
def calibrated(calibrated_classifier_dir):
    """The tiny classifier with its conformal calibration (LAC sets, T = 30) and temperatures."""
    return load_version("tiny", calibrated_classifier_dir)


def _with_aps(model: ServedModel) -> ServedModel:
    """``model`` as if calibrated before LAC: randomized APS sets, whose tie-breaks read each row and seed."""
    stored = model.metadata.conformal
    scores = np.linspace(0.0, 1.0, len(stored.scores)).tolist()
    aps = stored.model_copy(update={"score": "aps-randomized", "scores": scores})
    return replace(model, metadata=model.metadata.model_copy(update={"conformal": aps}))


@pytest.mark.parametrize("score", ["lac", "aps-randomized"])
def test_conformal_answers_of_a_call_are_each_requests_alone(calibrated, digit_rows, score):
    """Sets and abstention computed once for a call's requests (fixed T, and ``auto``'s stretches): each request's
    are those it gets alone, from its own rows and seed (APS tie-breaks), at its T, alpha and risk."""
    model = calibrated if score == "lac" else _with_aps(calibrated)
    segments = requests(digit_rows)
    draws = signatures.segment_draws(model.saved_model.signatures["mc_dropout_segments"], segments)
    for alpha, risk in [(None, None), (0.3, 0.5)]:
        together = Summarizer(model, alpha, risk)(segments, draws)
        settled = Settler(model, alpha, risk)(segments, draws)
        sizes = []
        for segment, drawn, (summary, answer), stretch in zip(segments, draws, together, settled, strict=True):
            alone = summarize(model, drawn)
            expected = conformal_answer(model, alone, segment.inputs, segment.seed, segment.samples, alpha, risk)
            assert answer.prediction_set.shape == (len(segment.inputs), 10) and answer.abstain.dtype == bool
            assert answer.note is not None and answer.alpha == (alpha or 0.1)
            assert_same_bits(alone, summary, "summary")
            assert_same_bits(expected, answer, f"conformal {score} alpha={alpha}")
            assert_same_bits(expected, stretch[3], f"auto stretch's conformal {score} alpha={alpha}")
            sizes += answer.prediction_set.sum(axis=1).tolist()
        assert len(set(sizes)) > 1  # sets of several sizes: a check that could fail
    if score == "aps-randomized":  # another seed's tie-breaks give other sets: the per-row seeds were read
        differ = []
        for segment, (summary, answer) in zip(segments, Summarizer(model)(segments, draws), strict=True):
            shifted = conformal_answer(model, summary, segment.inputs, segment.seed + 1, segment.samples, None, None)
            differ.append(not np.array_equal(answer.prediction_set, shifted.prediction_set))
        assert any(differ)


def test_jobs_with_one_prepare_share_one_call_of_it_and_its_failure_is_theirs_only(served, digit_rows):
    prepared: list[int] = []

    def draw(segments: list[Segment]) -> list[signatures.Samples]:
        return signatures.segment_draws(served.saved_model.signatures["mc_dropout_segments"], segments)

    def count(segments: list[Segment], draws: list[signatures.Samples]) -> list[tuple[int, int]]:
        prepared.append(len(draws))
        return [(s.seed, d.outputs.shape[0]) for s, d in zip(segments, draws, strict=True)]

    def fail(segments: list[Segment], draws: list[signatures.Samples]) -> list:
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
            assert result == (segment.seed, segment.samples)  # each job's own segment and draws
        elif plan is fail:
            assert isinstance(result, ValueError) and str(result) == "prepare failed"
        else:
            assert isinstance(result, signatures.Samples) and result.outputs.shape[0] == segment.samples
    assert prepared == [5], prepared  # the five `count` jobs of one call, prepared in one go
