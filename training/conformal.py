"""Conformal prediction sets and intervals, and abstention at a target risk: the math, in NumPy/SciPy.

Split conformal prediction (Vovk et al. 2005; Angelopoulos & Bates 2021): ``n`` calibration rows
that nothing was fitted on give conformity scores ``s_1 … s_n``; for a new row exchangeable with
them, the set of answers whose score is at most the ``⌈(n + 1)(1 - alpha)⌉``-th smallest calibration
score contains the truth with probability at least ``1 - alpha`` (and at most ``1 - alpha + 1 / (n + 1)``
when scores have no ties), whatever the model. Scores:

- **classification, LAC** (least ambiguous set-valued classifier, Sadinle, Lei & Wasserman 2019), the
  default since issue 19's second round: the score of class ``y`` is ``1 - p_y``, so the set holds every
  class whose probability is at least one minus the threshold. Among sets with the same coverage
  these have the least expected size when the probabilities are the true ones, which is why a
  calibrated predictive gets small LAC sets. A set is empty when no class is probable enough: the
  row is among the hardest ``alpha`` of them (rows the set may miss at that level).
- **classification, APS** (adaptive prediction sets, Romano, Sesia & Candès 2020), randomized, the
  score of versions exported before LAC (they keep it):
  the classes sorted by probability, the score of class ``y`` is the probability of the classes
  ranked above it plus ``u · p_y`` with ``u`` uniform in [0, 1). Randomization is what makes the
  coverage exact rather than at least the accuracy (a 98 %-accurate classifier's never-empty sets
  cover 98 % at any alpha above 0.02); it can leave a set empty when the model is sure and the level
  allows missing a row. ``u`` comes from ``tie_breaks``: a hash of the instance and the MC seed,
  so a replayed request gets the same sets.
- **regression, normalized residual** ``max_d |y_d - μ_d| / sigma_d`` with sigma the MC predictive's total
  standard deviation (epistemic and aleatoric, per instance for a heteroscedastic model): the
  interval ``μ ± q sigma`` is wide where the model says it is unsure.

Abstention (selective classification, Geifman & El-Yaniv 2017, tested as in Learn-then-Test,
Angelopoulos et al. 2021): accept a row when its uncertainty (``uncertainty``: ``1 - p`` of the
predicted label, plus the MC samples' mutual information since issue 19's second round) is at most λ. λ is the loosest
threshold such that every threshold from the strictest candidate up to it has a Clopper-Pearson
upper bound (confidence ``1 - δ``) on the error among accepted calibration rows at most the risk:
fixed-sequence testing, so with probability ``1 - δ`` the chosen rule's error among accepted rows
is at most the risk. The sequence starts at the first threshold that accepts enough rows for zero
errors to pass the bound; thresholds are the calibration rows' own uncertainties (labels play no
part in choosing them).

NumPy only (no SciPy): the server imports this module, and SciPy belongs to the training extra.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_TINY = 1e-12
_CHUNK = 256
"""Abstention candidates whose binomial tail is computed at once (memory: chunk x errors)."""


def check_level(name: str, value: float) -> float:
    """``value`` if it is a number strictly between 0 and 1, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def quantile(sorted_scores: np.ndarray, alpha: float) -> float:
    """The ``⌈(n + 1)(1 - alpha)⌉``-th smallest of ``n`` sorted scores; infinite when that exceeds ``n``
    (too few rows for the level: the whole label set, an unbounded interval)."""
    n = len(sorted_scores)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # 1e-9: (n + 1) · 0.9 must not round up to one more
    return float("inf") if rank > n else float(sorted_scores[rank - 1])


def tie_breaks(rows: np.ndarray, seed: int | np.ndarray) -> np.ndarray:
    """One uniform number in [0, 1) per row, a hash of ``seed`` (one for all rows, or one per row) and the row's
    float32 bytes.

    Deterministic (the same instance and seed give the same number, in any process and batch) and,
    for APS, as good as independent uniforms: nothing about a row's label enters the hash.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(len(rows), -1)
    seeds = [seed] * len(rows) if np.ndim(seed) == 0 else np.asarray(seed).tolist()
    out = np.empty(len(rows))
    for i, (row, row_seed) in enumerate(zip(rows, seeds, strict=True)):
        key = int(row_seed).to_bytes(8, "little", signed=False)
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest()
        out[i] = (int.from_bytes(digest, "little") >> 11) * 2.0**-53
    return out


def _ranked(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class order by descending probability (ties by index), sorted probabilities, mass ranked above."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-probabilities, axis=-1, kind="stable")
    ranked = np.take_along_axis(probabilities, order, axis=-1)
    return order, ranked, np.cumsum(ranked, axis=-1) - ranked


def aps_scores(probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Randomized APS score of each row's label: mass of the classes ranked above it + ``u · p_label``."""
    order, ranked, above = _ranked(probabilities)
    rank = np.argmax(order == np.asarray(labels)[:, None], axis=-1)[:, None]
    return (np.take_along_axis(above, rank, -1) + u[:, None] * np.take_along_axis(ranked, rank, -1))[:, 0]


def aps_sets(probabilities: np.ndarray, threshold: float, u: np.ndarray) -> np.ndarray:
    """``[N, K]`` membership: class ``k`` is in the set when its APS score is at most ``threshold``."""
    order, ranked, above = _ranked(probabilities)
    inside = above + u[:, None] * ranked <= threshold
    members = np.zeros(inside.shape, dtype=bool)
    np.put_along_axis(members, order, inside, axis=-1)
    return members


def lac_scores(probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
    """LAC score of each row's label, ``1 - p_label`` (``u`` unused: the score needs no tie-breaks)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return 1.0 - probabilities[np.arange(len(probabilities)), np.asarray(labels)]


def lac_sets(probabilities: np.ndarray, threshold: float, u: np.ndarray | None = None) -> np.ndarray:
    """``[N, K]`` membership: class ``k`` is in the set when ``1 - p_k`` is at most ``threshold``."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64) <= threshold


SET_SCORES = {"aps-randomized": (aps_scores, aps_sets), "lac": (lac_scores, lac_sets)}
"""Classification conformity scores by their stored name: (score of a label, sets at a threshold)."""
RANDOMIZED = frozenset({"aps-randomized"})
"""The ``SET_SCORES`` that read ``tie_breaks`` (the others take None for them)."""


def set_scores(score: str, probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The ``score`` (a ``SET_SCORES`` name) of each row's label."""
    return SET_SCORES[score][0](probabilities, labels, u)


def sets(score: str, probabilities: np.ndarray, threshold: float, u: np.ndarray | None) -> np.ndarray:
    """``[N, K]`` membership of the sets of the ``score`` at ``threshold``."""
    return SET_SCORES[score][1](probabilities, threshold, u)


def normalized_scores(targets: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``max_d |y_d - μ_d| / sigma_d`` per row (one output: the plain normalized residual)."""
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    residual = np.abs(targets - np.asarray(mean, dtype=np.float64).reshape(targets.shape))
    return (residual / np.maximum(np.asarray(scale, dtype=np.float64).reshape(targets.shape), _TINY)).max(axis=-1)


def interval(mean: np.ndarray, scale: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """``μ ± q sigma``: the conformal interval of a normalized-residual quantile ``q``."""
    half = q * np.maximum(np.asarray(scale, dtype=np.float64), _TINY)
    return mean - half, mean + half


def binomial_cdf(errors: np.ndarray, rows: np.ndarray, p: float | np.ndarray) -> np.ndarray:
    """``P(Binomial(rows, p) <= errors)`` elementwise, summed in log space (exact up to float rounding)."""
    errors, rows = np.asarray(errors, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), errors.shape)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(rows.max(initial=0)) + 1)))])
    i = np.arange(int(errors.max(initial=0)) + 1)[None, :]
    n, k = rows[:, None], errors[:, None]
    rest = np.maximum(n - i, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = (
            log_factorial[n]
            - log_factorial[np.minimum(i, n)]
            - log_factorial[rest]
            + i * np.log(p[:, None])
            + rest * np.log1p(-p[:, None])
        )
    return np.minimum(np.where((i <= k) & (i <= n), np.exp(log_pmf), 0.0).sum(axis=1), 1.0)


def clopper_pearson_upper(errors: np.ndarray, rows: np.ndarray, delta: float) -> np.ndarray:
    """Upper ``1 - delta`` Clopper-Pearson bound on an error rate from ``errors`` out of ``rows``: the rate at
    which seeing at most ``errors`` has probability ``delta`` (bisection; 1 when every row is an error)."""
    errors, rows = np.asarray(errors, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    low, high = np.zeros(errors.shape), np.ones(errors.shape)
    for _ in range(60):
        middle = (low + high) / 2
        above = binomial_cdf(errors, rows, middle) > delta  # the bound is higher
        low, high = np.where(above, middle, low), np.where(above, high, middle)
    return np.where(errors >= rows, 1.0, high)


def abstention_threshold(uncertainty: np.ndarray, correct: np.ndarray, risk: float, delta: float) -> float:
    """The loosest uncertainty threshold λ (accept when ``uncertainty <= λ``) whose error among accepted
    calibration rows passes the fixed-sequence Clopper-Pearson test at ``risk``; ``-inf``: abstain always.

    A threshold passes when its Clopper-Pearson bound is at most ``risk``, that is when at most that many
    errors among that many accepted rows would have probability at most ``delta`` at an error rate of ``risk``.
    """
    order = np.argsort(uncertainty, kind="stable")
    ranked, errors = np.asarray(uncertainty, dtype=np.float64)[order], ~np.asarray(correct, dtype=bool)[order]
    candidates = np.unique(ranked)
    accepted = np.searchsorted(ranked, candidates, side="right")
    errors_accepted = np.cumsum(errors)[accepted - 1]
    fewest = math.ceil(math.log(delta) / math.log1p(-risk))  # zero errors in fewer rows cannot pass
    first = int(np.searchsorted(accepted, fewest))
    last = first  # candidates before ``last`` passed
    for start in range(first, len(candidates), _CHUNK):
        rows = slice(start, start + _CHUNK)
        failures = np.flatnonzero(binomial_cdf(errors_accepted[rows], accepted[rows], risk) > delta)
        if len(failures):
            last = start + int(failures[0])
            break
        last = min(start + _CHUNK, len(candidates))
    return float("-inf") if last == first else float(candidates[last - 1])


def top_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """``1 - max_k p_k``: the abstention score (softmax response) of a predictive."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64).max(axis=-1)


MUTUAL_INFORMATION_WEIGHTS = {
    "1 - probability": 0.0,
    "1 - probability + mutual information": 1.0,
    "1 - probability + 3 * mutual information": 3.0,
}
"""Abstention scores by their stored name: ``1 - max_k p_k`` plus this many times the MC samples' mutual information."""
UNCERTAINTIES = tuple(MUTUAL_INFORMATION_WEIGHTS)


def uncertainty(name: str, probabilities: np.ndarray, mutual_information: np.ndarray) -> np.ndarray:
    """The abstention score ``name`` of each row: ``1 - max_k p_k``, plus its weight times the MC samples'
    mutual information (nats). A deterministic prediction has none (its samples cannot disagree): pass zeros."""
    weight = MUTUAL_INFORMATION_WEIGHTS.get(name)
    if weight is None:
        raise ValueError(f"unknown abstention score {name!r}")
    top = top_uncertainty(probabilities)
    return top + weight * np.asarray(mutual_information, dtype=np.float64) if weight else top
