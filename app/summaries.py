"""What an MC-dropout answer says, computed once for every door: the per-instance summary object.

``summarize`` turns the draws into a ``ClassificationSummary``, ``RegressionSummary`` or (a SavedModel
without a task) ``RawSummary``, and observes it for the uncertainty histograms, so every door's MC
traffic is counted the same way. Doors only encode the object: the native API per instance,
tensor protocols (v2 REST and gRPC) through ``tensors``, by the names ``output_names`` lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from app import metrics
from app.loading import ServedModel
from training import adaptive, conformity, signatures
from training.uncertainty import (
    ClassificationSummary,
    RegressionSummary,
    sample_mean,
    sample_std,
    summarize_classification,
    summarize_regression,
)


@dataclass(frozen=True, slots=True)
class RawSummary:
    """A model without a task: the mean and standard deviation of its outputs over the draws."""

    mean: np.ndarray
    std: np.ndarray


Summary = ClassificationSummary | RegressionSummary | RawSummary


@dataclass(frozen=True, slots=True)
class ConformalAnswer:
    """What the version's stored conformal calibration says about this request's instances.

    Classifiers: ``prediction_set [N, K]`` (class membership, in class-label order) at coverage
    ``1 - alpha`` and ``abstain [N]`` at ``risk``; regression: ``lower``/``upper [N, *output_shape]``,
    the conformal interval at ``1 - alpha``. ``note`` says when the request's T differs from the
    calibration's (the guarantee is then approximate).
    """

    alpha: float
    risk: float | None = None
    prediction_set: np.ndarray | None = None
    abstain: np.ndarray | None = None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    note: str | None = None


def conformal_answer(
    model: ServedModel,
    summary: Summary,
    rows: np.ndarray,
    seed: int | np.ndarray,
    samples: int,
    alpha: float | None,
    risk: float | None,
) -> ConformalAnswer | None:
    """Sets and abstention, or conformal intervals, for ``summary``; None when the version has no usable
    calibration (``conformity.unavailable`` says why) or no task. ``seed``: the request's, or one per instance
    of ``rows`` (requests answered together, ``Summarizer``)."""
    if isinstance(summary, RawSummary) or conformity.unavailable(model.metadata) is not None:
        return None
    calibration = model.metadata.conformal
    alpha = conformity.DEFAULT_ALPHA if alpha is None else alpha
    note = conformity.samples_note(calibration, samples)
    if isinstance(summary, RegressionSummary):
        lower, upper = conformity.intervals(calibration, summary, alpha)
        return ConformalAnswer(alpha, lower=lower, upper=upper, note=note)
    risk = calibration.default_risk if risk is None else risk
    return ConformalAnswer(
        alpha,
        risk,
        prediction_set=conformity.prediction_sets(calibration, summary, rows, seed, alpha),
        abstain=conformity.abstentions(calibration, summary, risk),
        note=note,
    )


MC_OUTPUTS: dict[str | None, list[str]] = {
    "classification": [
        "probabilities",
        "std",
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "variation_ratio",
    ],
    "regression": ["mean", "epistemic_std", "aleatoric_std", "total_std", "interval_lower", "interval_upper"],
    None: ["mean", "std"],
}
"""Output tensors of an MC-dropout answer by task (None: a SavedModel without metadata)."""
CONFORMAL_OUTPUTS: dict[str | None, list[str]] = {
    "classification": ["prediction_set", "abstain"],
    "regression": ["conformal_lower", "conformal_upper"],
}
"""More output tensors of a version with a usable conformal calibration (``conformal_answer``)."""


def summarize(model: ServedModel, draws: signatures.Samples, observe: bool = True) -> Summary:
    """The per-instance MC summaries of ``draws``, observed for the uncertainty histograms.

    A calibrated classifier's predictive comes from ``mc_dropout``'s ``predictive`` when the request was
    one ``mc_dropout`` call, else (batched, or drawn in stretches by ``samples: "auto"``, which keep no
    per-call predictive) from the request's own draws here: the same bits whichever calls they came from.
    """
    outputs = draws.outputs.astype(np.float64)
    summary: ClassificationSummary | RegressionSummary
    if model.task == "classification":
        # calibrated, if the model is: mc_dropout's predictive, else the draws' mean at the model's temperature
        summary = summarize_classification(outputs, draws.predictive, model.predictive_temperature)
    elif model.task == "regression":
        summary = summarize_regression(outputs, model.tau, draws.variance)  # variance: heteroscedastic noise
    else:
        mean = sample_mean(outputs)
        return RawSummary(mean, sample_std(outputs, mean))
    if observe:
        metrics.observe_mc(model.name, model.version, model.task, summary)
    return summary


Answered = tuple[Summary, ConformalAnswer | None]
"""What ``Summarizer`` gives each request: its summary and its ``conformal_answer``."""


@dataclass(frozen=True, slots=True)
class Summarizer:
    """``summarize`` and ``conformal_answer`` for many requests of one version and levels at once: MC batching's
    answers of a call (and an unbatched request's, as a call of one).

    The requests with the same T are summarized and answered as one array, one NumPy pass instead of one per
    request (one request alone costs ~70 µs of Python, most of it per call, not per instance: ~20 µs each among
    24). Every value of an instance reads only that instance's draws (and its row and seed: tie-breaks), with
    reductions laid out so the bits do not depend on the other instances (``training.uncertainty.sample_mean``);
    sets, abstention and intervals are per-instance comparisons. So a request's answer is the same computed alone
    or beside others.
    Equal for the same version, alpha and risk (requests asking other levels are answered in groups of their own):
    the batcher groups jobs by it.
    """

    model: ServedModel
    alpha: float | None = None
    risk: float | None = None

    def __call__(self, segments: list[signatures.Segment], draws: list[signatures.Samples]) -> list[Answered]:
        """Each request's summary and conformal answer, in order."""
        return _by_t(segments, draws, self._answer)

    def _answer(self, joined: signatures.Samples, rows: np.ndarray, seed: int | np.ndarray) -> Answered:
        return _answered(self.model, joined, rows, seed, self.alpha, self.risk)


Settled = tuple[signatures.Samples, Summary, np.ndarray, ConformalAnswer | None]
"""What ``Settler`` gives each ``auto`` stretch: its draws so far, their summary, Monte-Carlo errors and conformal
answer (the request's answer if its instances all stop here)."""


@dataclass(frozen=True, slots=True)
class Settler:
    """For ``samples: "auto"``: a stretch of many requests at once (each one's draws so far), each one's draws,
    summary (not yet observed for the metrics: the request may sample on), Monte-Carlo errors (``training.adaptive``)
    and conformal answer at the request's levels, computed together as ``Summarizer`` does (the errors are
    layout-invariant too). Equal for the same version, alpha and risk."""

    model: ServedModel
    alpha: float | None = None
    risk: float | None = None

    def __call__(self, segments: list[signatures.Segment], draws: list[signatures.Samples]) -> list[Settled]:
        """Each request's (draws, summary, errors, conformal answer), in order."""
        found = _by_t(segments, draws, self._settle)
        return [(drawn, *settled) for drawn, settled in zip(draws, found, strict=True)]

    def _settle(
        self, joined: signatures.Samples, rows: np.ndarray, seed: int | np.ndarray
    ) -> tuple[Summary, np.ndarray, ConformalAnswer | None]:
        model = self.model
        errors = adaptive.error_function(model.task, model.tau, model.predictive_temperature)
        summary, conformal = _answered(model, joined, rows, seed, self.alpha, self.risk, observe=False)
        return summary, errors(joined), conformal


def _answered(
    model: ServedModel,
    joined: signatures.Samples,
    rows: np.ndarray,
    seed: int | np.ndarray,
    alpha: float | None,
    risk: float | None,
    observe: bool = True,
) -> Answered:
    """The summary and conformal answer of draws at their T (``Summarizer`` and ``Settler``)."""
    summary = summarize(model, joined, observe)
    return summary, conformal_answer(model, summary, rows, seed, joined.outputs.shape[0], alpha, risk)


def _by_t(
    segments: list[signatures.Segment],
    draws: list[signatures.Samples],
    compute: Callable[[signatures.Samples, np.ndarray, int | np.ndarray], tuple],
) -> list[tuple]:
    """``compute`` of each request's draws, rows and seed, run once on the requests with the same T (their instances
    side by side, a seed per instance), each value it returns (dataclasses of arrays ``[N, ...]``, such arrays,
    None) split back by instances."""
    results: list[tuple | None] = [None] * len(draws)
    same_t: dict[tuple[int, ...], list[int]] = {}
    for i, drawn in enumerate(draws):
        if drawn.predictive is not None:  # mc_dropout's own predictive: per request
            results[i] = compute(drawn, segments[i].inputs, segments[i].seed)
        else:
            same_t.setdefault((drawn.outputs.shape[0], *drawn.outputs.shape[2:]), []).append(i)
    for members in same_t.values():
        if len(members) == 1:  # alone in its group: nothing to join or split
            i = members[0]
            results[i] = compute(draws[i], segments[i].inputs, segments[i].seed)
            continue
        parts = [draws[i] for i in members]
        sizes = [p.outputs.shape[1] for p in parts]
        variance = None if parts[0].variance is None else np.concatenate([p.variance for p in parts], axis=1)
        whole = compute(
            signatures.Samples(np.concatenate([p.outputs for p in parts], axis=1), variance),
            np.concatenate([segments[i].inputs for i in members]),
            np.repeat([segments[i].seed for i in members], sizes),
        )
        spans = list(itertools.pairwise(np.cumsum([0, *sizes]).tolist()))
        for i, *shares in zip(members, *(_split(value, spans) for value in whole), strict=True):
            results[i] = tuple(shares)
    return results  # type: ignore[return-value]


def _split(value: Any, spans: list[tuple[int, int]]) -> list[Any]:
    """Instances ``start .. stop - 1`` of ``value`` for each span: an array ``[N, ...]``, a dataclass of such arrays
    (its other fields, e.g. a homoscedastic aleatoric std, shared), or None."""
    if value is None:
        return [None] * len(spans)
    if isinstance(value, np.ndarray):
        return [value[start:stop] for start, stop in spans]
    kind, fields_ = type(value), [getattr(value, field.name) for field in fields(value)]
    arrays = [isinstance(field, np.ndarray) for field in fields_]
    return [kind(*[v[start:stop] if a else v for v, a in zip(fields_, arrays, strict=True)]) for start, stop in spans]


def output_names(model: ServedModel, mc: bool, auto: bool = False) -> list[str]:
    """The output tensors an answer of ``model`` has: its output key, or the MC summary's (and with
    ``samples: "auto"``, ``samples_used``: each instance's T)."""
    if not mc:
        return [model.output_key]
    names = MC_OUTPUTS[model.task]
    if model.task is not None and conformity.unavailable(model.metadata) is None:
        names = names + CONFORMAL_OUTPUTS[model.task]
    noise = model.tau is not None or (model.metadata is not None and model.metadata.likelihood == "heteroscedastic")
    names = [n for n in names if n != "aleatoric_std"] if model.task == "regression" and not noise else names
    return [*names, SAMPLES_USED] if auto else names


SAMPLES_USED = "samples_used"
"""With ``samples: "auto"``: the T each prediction used (a field of each native prediction, an INT64 tensor)."""


def merge(parts: list[tuple[np.ndarray, Summary]], count: int) -> Summary:
    """One summary of ``count`` instances from the summaries of disjoint groups of them (``rows`` each):
    ``samples: "auto"`` summarizes together the instances that stopped at the same T."""
    if len(parts) == 1:
        rows, summary = parts[0]
        if np.array_equal(rows, np.arange(count)):
            return summary
    first = parts[0][1]
    merged = {}
    for field in fields(first):
        values = [getattr(summary, field.name) for _, summary in parts]
        if not isinstance(values[0], np.ndarray):  # the same for every group (a homoscedastic aleatoric std)
            merged[field.name] = values[0]
            continue
        whole = np.empty((count, *values[0].shape[1:]), values[0].dtype)
        for (rows, _), value in zip(parts, values, strict=True):
            whole[rows] = value
        merged[field.name] = whole
    return type(first)(**merged)


def tensors(
    summary: Summary, output_shape: tuple[int, ...], conformal: ConformalAnswer | None = None
) -> dict[str, np.ndarray]:
    """The summary as named tensors ``[N, ...]`` (FP64; BOOL for sets and abstention), as tensor protocols
    answer it."""
    named = _summary_tensors(summary, output_shape)
    if conformal is not None and conformal.prediction_set is not None:
        named.update(prediction_set=conformal.prediction_set, abstain=conformal.abstain)
    elif conformal is not None:
        named.update(
            conformal_lower=conformal.lower.reshape(-1, *output_shape),
            conformal_upper=conformal.upper.reshape(-1, *output_shape),
        )
    return named


def _summary_tensors(summary: Summary, output_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    if isinstance(summary, ClassificationSummary):
        return {
            "probabilities": summary.mean,
            "std": summary.std,
            "predictive_entropy": summary.predictive_entropy,
            "expected_entropy": summary.expected_entropy,
            "mutual_information": summary.mutual_information,
            "variation_ratio": summary.variation_ratio,
        }
    if isinstance(summary, RegressionSummary):
        named = {
            "mean": summary.mean,
            "epistemic_std": summary.epistemic_std,
            "total_std": summary.total_std,
            "interval_lower": summary.lower,
            "interval_upper": summary.upper,
        }
        if summary.aleatoric_std is not None:  # one value, or one per instance
            named["aleatoric_std"] = np.broadcast_to(summary.aleatoric_std, summary.total_std.shape)
        return {name: value.reshape(-1, *output_shape) for name, value in named.items()}
    return {"mean": summary.mean, "std": summary.std}
