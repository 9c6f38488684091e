"""Adaptive T: how many Monte-Carlo samples settle an answer (pure NumPy, shared by the server and benchmarks).

An MC answer is an average over T random draws of the network, so it carries a Monte-Carlo error
that shrinks as 1/sqrt(T). Here that error is estimated from the draws themselves, for what
decides the answer: a classifier's served top-class probability and its mutual information (the
epistemic uncertainty it reports), a regressor's predictive mean relative to its total std. Both
are smooth functions of sample means, so their standard errors follow from the delta method: the
function's gradient at the mean turns each sample into one number ``z_t``, and the standard error
is ``std(z) / sqrt(T)``.

Sampling goes in stretches. Every instance starts with ``first`` samples; an instance whose error
is above the tolerance asks for the T its error predicts (``T (error / tolerance)^2``), at least one
more ``step``, rounded up to a multiple of ``step``, and never more than the maximum. It jumps there
at once: a stretch costs a server far more than its samples do (a round trip through the batcher
and the per-call Python), so overshooting by a few samples is cheaper than another round. Every
decision reads only the instance's own draws, and sample t is the same whichever stretch draws it
(``training.mc_dropout``), so an instance's answer and T depend only on its input and the seed:
``samples: "auto"`` with a seed replays exactly, and equals ``samples: T`` with the same seed for
the T it reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from training.draws import Samples, Segment, calibrated_predictive
from training.uncertainty import entropy, sample_mean

DEFAULT_TOLERANCE = 0.05
"""The Monte-Carlo standard error at which an answer counts as settled, unless a request names its own.
Chosen on the digits model's validation rows (README, "Adaptive T"): the smallest tolerance on a 0.01
grid whose mean T stays within 30, with the label and top probability of a T = 2,000 reference kept."""

DEFAULT_MAXIMUM = 1000
"""The most samples ``auto`` draws for one instance unless the server is told otherwise: an input the model
cannot settle (far from its training data) stops here, at 10x the default fixed T."""


def _standard_error(z: np.ndarray) -> np.ndarray:
    """``std(z) / sqrt(T)`` over the sample axis 0 (unbiased variance; 0 for a single sample), an instance's
    the same bits whatever other instances ``z`` holds (``sample_mean``): requests' errors can be estimated
    together."""
    count = z.shape[0]
    if count < 2:
        return np.zeros(z.shape[1:])
    variance = sample_mean((z - sample_mean(z)) ** 2) * (count / (count - 1))
    return np.sqrt(variance) / math.sqrt(count)


def top_probability_error(samples: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Per instance, the Monte-Carlo standard error of the served top-class probability, from ``samples [T, N, K]``.

    The served probabilities are the mean ``m`` of the samples, or ``q = softmax(log m / temperature)``
    for a calibrated classifier, whose top probability has the gradient ``q_k (δ_kj - q_j) / (τ m_j)``.
    """
    p = np.ascontiguousarray(samples, dtype=np.float64)
    mean = sample_mean(p)
    if temperature is None:
        top = mean.argmax(axis=-1)[None, :, None]
        return _standard_error(np.take_along_axis(p, top, axis=-1)[..., 0])
    served = calibrated_predictive(p, temperature)
    top = served.argmax(axis=-1)[:, None]
    onehot = np.arange(served.shape[-1]) == top
    gradient = np.take_along_axis(served, top, axis=-1) * (onehot - served) / (temperature * np.maximum(mean, 1e-300))
    return _standard_error((p * gradient).sum(axis=-1))


def mutual_information_error(samples: np.ndarray) -> np.ndarray:
    """Per instance, the Monte-Carlo standard error of the mutual information ``H(m) - mean_t H(p_t)``
    from ``samples [T, N, K]``: ``z_t = -Σ_j p_tj log m_j - H(p_t)`` (``Σ_j p_tj = 1`` drops the constant)."""
    p = np.ascontiguousarray(samples, dtype=np.float64)
    log_mean = np.log(np.maximum(sample_mean(p), 1e-300))
    return _standard_error(-(p * log_mean).sum(axis=-1) - entropy(p))


def classification_error(samples: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Per instance, the larger of the two errors that decide a classifier's MC answer."""
    return np.maximum(top_probability_error(samples, temperature), mutual_information_error(samples))


def regression_error(samples: np.ndarray, tau: float | None, variance: np.ndarray | None = None) -> np.ndarray:
    """Per instance, the Monte-Carlo standard error of the predictive mean over the total std (the
    largest over outputs), from ``samples [T, N, ...]`` (and a heteroscedastic model's ``variance``)."""
    draws = np.ascontiguousarray(samples, dtype=np.float64)
    draws = draws.reshape(draws.shape[0], draws.shape[1], -1)
    epistemic = sample_mean((draws - sample_mean(draws)) ** 2)
    if variance is not None:
        aleatoric = sample_mean(np.asarray(variance, dtype=np.float64).reshape(draws.shape))
    else:
        aleatoric = 0.0 if tau is None else 1.0 / tau
    total = np.sqrt(epistemic + aleatoric)
    error = _standard_error(draws)
    relative = np.divide(error, total, out=np.zeros_like(error), where=total > 0)
    return relative.max(axis=-1)


@dataclass(frozen=True, slots=True)
class Schedule:
    """How an instance's samples grow: ``first`` at once, then multiples of ``step`` (see the module)."""

    first: int = 10
    step: int = 10

    def start(self, maximum: int) -> int:
        return min(self.first, maximum)

    def target(self, used: int, error: float, tolerance: float, maximum: int) -> int:
        """The T an instance with ``used`` samples and Monte-Carlo ``error`` should reach; ``used``: settled."""
        if error <= tolerance or used >= maximum:
            return used
        wanted = math.ceil(used * (error / tolerance) ** 2 / self.step) * self.step
        return min(max(wanted, used + self.step), maximum)


def error_function(
    task: str | None, tau: float | None = None, predictive_temperature: float | None = None
) -> Callable[[Samples], np.ndarray]:
    """The per-instance Monte-Carlo error of a model's MC answer, from its draws (None: no task, no answer)."""
    if task == "classification":
        return lambda draws: classification_error(draws.outputs, predictive_temperature)
    if task == "regression":
        return lambda draws: regression_error(draws.outputs, tau, draws.variance)
    raise ValueError("adaptive sampling needs a classification or regression model")


@dataclass(slots=True)
class _Group:
    """Instances (``rows`` of the request) with the same samples so far and the same target."""

    rows: np.ndarray
    draws: Samples | None  # [used, len(rows), ...]
    used: int
    target: int


@dataclass(slots=True)
class Step:
    """What one stretch's draws decide for its group: the groups that go on, the parts that stopped."""

    active: list[_Group]
    finished: list[tuple[np.ndarray, Samples]]


class Adaptive:
    """One request's adaptive sampling: which stretches to draw next (``pending``), what each one's draws
    decide (``step``, no side effects, so a server runs it in its worker thread), taking those decisions
    (``advance``), and each instance's draws when done (``finished``).

    Instances that share their samples so far and their next target share a ``Segment`` (masks
    depend only on seed and sample, so grouping never changes a draw), which keeps calls few.
    """

    def __init__(
        self,
        inputs: np.ndarray,
        seed: int,
        error: Callable[[Samples], np.ndarray],
        tolerance: float,
        maximum: int,
        schedule: Schedule = Schedule(),
    ) -> None:
        self._inputs, self._seed, self._error = inputs, seed, error
        self._tolerance, self._maximum, self._schedule = tolerance, maximum, schedule
        self._active = [_Group(np.arange(len(inputs)), None, 0, schedule.start(maximum))]
        self.finished: list[tuple[np.ndarray, Samples]] = []
        """(rows, draws [T, len(rows), ...]) per group of instances that stopped at the same T."""

    def pending(self) -> list[Segment]:
        """The stretches to draw next, one per active group; empty when every instance has settled."""
        return [Segment(self._inputs[g.rows], self._seed, g.used, g.target - g.used, g.draws) for g in self._active]

    def step(self, index: int, draws: Samples, errors: np.ndarray | None = None) -> Step:
        """What the draws of ``pending()[index]`` decide (all of its instances' draws so far, the stretch's after
        its ``earlier`` ones): each instance's next target (``errors``: their Monte-Carlo errors, if already
        estimated)."""
        group = self._active[index]
        used = group.target
        errors = self._error(draws) if errors is None else errors
        targets = np.array([self._schedule.target(used, float(e), self._tolerance, self._maximum) for e in errors])
        step = Step([], [])
        for target in np.unique(targets):
            keep = targets == target
            part = draws if keep.all() else Samples(*(None if a is None else a[:, keep] for a in draws[:2]))
            if target == used:
                step.finished.append((group.rows[keep], part))
            else:
                step.active.append(_Group(group.rows[keep], part, used, int(target)))
        return step

    def advance(self, steps: list[Step]) -> None:
        """Take the steps of every pending stretch, in order."""
        if len(steps) != len(self._active):
            raise ValueError(f"{len(steps)} steps for {len(self._active)} pending stretches")
        self._active = [group for step in steps for group in step.active]
        self.finished += [part for step in steps for part in step.finished]

    def run(self, draw: Callable[[list[Segment]], list[Samples]]) -> list[tuple[np.ndarray, Samples]]:
        """Draw until done, synchronously (``draw``: e.g. ``partial(segment_draws, signature)``)."""
        while segments := self.pending():
            self.advance([self.step(i, drawn) for i, drawn in enumerate(draw(segments))])
        return self.finished
