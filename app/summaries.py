"""What an MC-dropout answer says, computed once for every door: the per-instance summary object.

``summarize`` turns the draws into a ``ClassificationSummary``, ``RegressionSummary`` or (a SavedModel
without a task) ``RawSummary``, and observes it for the uncertainty histograms, so every door's MC
traffic is counted the same way. Doors only encode the object: the native API per instance,
tensor protocols (v2 REST and gRPC) through ``tensors``, by the names ``output_names`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app import metrics
from app.loading import ServedModel
from training import signatures
from training.uncertainty import (
    ClassificationSummary,
    RegressionSummary,
    summarize_classification,
    summarize_regression,
)


@dataclass(frozen=True, slots=True)
class RawSummary:
    """A model without a task: the mean and standard deviation of its outputs over the draws."""

    mean: np.ndarray
    std: np.ndarray


Summary = ClassificationSummary | RegressionSummary | RawSummary

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


def summarize(model: ServedModel, draws: signatures.Samples) -> Summary:
    """The per-instance MC summaries of ``draws``, observed for the uncertainty histograms."""
    outputs = draws.outputs.astype(np.float64)
    summary: ClassificationSummary | RegressionSummary
    if model.task == "classification":
        summary = summarize_classification(outputs, draws.predictive)  # predictive: calibrated, if the model is
    elif model.task == "regression":
        summary = summarize_regression(outputs, model.tau, draws.variance)  # variance: heteroscedastic noise
    else:
        return RawSummary(outputs.mean(axis=0), outputs.std(axis=0))
    metrics.observe_mc(model.name, model.version, model.task, summary)
    return summary


def output_names(model: ServedModel, mc: bool) -> list[str]:
    """The output tensors an answer of ``model`` has: its output key, or the MC summary's."""
    if not mc:
        return [model.output_key]
    names = MC_OUTPUTS[model.task]
    noise = model.tau is not None or (model.metadata is not None and model.metadata.likelihood == "heteroscedastic")
    return [n for n in names if n != "aleatoric_std"] if model.task == "regression" and not noise else names


def tensors(summary: Summary, output_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The summary as named tensors ``[N, ...]`` (FP64), as tensor protocols answer it."""
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
