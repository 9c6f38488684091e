"""What MC-dropout signatures give back, as plain NumPy (no TensorFlow): the client-side types of
``training.signatures`` and the arithmetic on them that needs no model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from training.uncertainty import sample_mean, tempered


class Samples(NamedTuple):
    """What one ``mc_dropout`` call returns: sampled outputs, per-sample variances and the calibrated
    predictive if it has them."""

    outputs: np.ndarray
    """``[T, N, ...]``: class probabilities, or predicted (mean) values."""
    variance: np.ndarray | None
    """``[T, N, ...]`` predicted aleatoric variance of a heteroscedastic model, else None."""
    predictive: np.ndarray | None = None
    """``[N, K]`` calibrated MC predictive of a temperature-calibrated classifier, else None."""


class Segment(NamedTuple):
    """One request's share of an ``mc_dropout_segments`` call: samples ``first .. first + samples - 1``
    of ``seed`` for its ``inputs``."""

    inputs: np.ndarray  # [N_r, ...] float32
    seed: int
    first: int
    samples: int
    earlier: Samples | None = None
    """Samples ``0 .. first - 1``, drawn before: the segment's draws come back joined after them."""


def joined(parts: Sequence[Samples]) -> Samples:
    """Draws taken in stretches (consecutive ``first``), as one: samples concatenated in order."""
    if len(parts) == 1:
        return parts[0]
    variance = None if parts[0].variance is None else np.concatenate([p.variance for p in parts])
    return Samples(np.concatenate([p.outputs for p in parts]), variance)


def continued(segment: Segment, drawn: Samples) -> Samples:
    """A segment's draws after its ``earlier`` ones, if it has any."""
    return drawn if segment.earlier is None else joined([segment.earlier, drawn])


def calibrated_predictive(outputs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(mean_t p_t) / temperature)`` of ``outputs [T, N, K]`` as ``[N, K]`` float64: the
    calibrated MC predictive that ``mc_dropout`` computes in-graph (float32) as ``predictive``, here over
    all of a request's samples. An instance's value reads only its own draws (``sample_mean``), so it is the
    same whoever shared the calls or the summaries."""
    return tempered(sample_mean(outputs), temperature)
