"""What a Monte-Carlo dropout request asks for, read once from any door's loosely typed wire values.

Every door hands ``monte_carlo`` the values it decoded (JSON fields, v2 parameters, TF Serving
inputs, gRPC parameters) with the names it calls them by, so each bad value is a 422 naming the
field the caller sent, the same checks for every door.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app.errors import ApiError, describe
from app.schemas import SEED_MAX
from training import conformal

AUTO = "auto"


@dataclass(slots=True, frozen=True)
class MonteCarlo:
    samples: int | Literal["auto"] | None = None
    """None: the server default (DROPOUT_SERVE_DEFAULT_SAMPLES); "auto": each instance samples until its answer
    is settled (``training.adaptive``), at most DROPOUT_SERVE_AUTO_MAX_SAMPLES."""
    seed: int | None = None
    """None: a fresh random seed, reported in the result."""
    return_samples: bool = False
    """The raw draws ``[T, N, ...]`` in the result (bounded by DROPOUT_SERVE_MAX_RETURN_VALUES)."""
    tolerance: float | None = None
    """With "auto": the Monte-Carlo standard error that settles an answer; None: DROPOUT_SERVE_AUTO_TOLERANCE."""
    alpha: float | None = None
    """Conformal sets and intervals at coverage 1 - alpha; None: 0.1 (``training.conformity.DEFAULT_ALPHA``)."""
    risk: float | None = None
    """Abstention at this risk; None: the version's stored default."""


def monte_carlo(
    samples: Any,
    seed: Any,
    return_samples: bool = False,
    tolerance: Any = None,
    *,
    names: tuple[str, ...],
    alpha: Any = None,
    risk: Any = None,
    level_names: tuple[str, str] = ("alpha", "risk"),
) -> MonteCarlo:
    """``MonteCarlo`` from loosely typed wire values (JSON parameters, TF Serving inputs, gRPC parameters),
    or a 422 that calls them by the door's ``names`` for samples, seed (and tolerance), ``level_names`` for
    alpha and risk."""
    if samples is not None and samples != AUTO and (type(samples) is not int or samples < 1):
        raise ApiError(422, f'{names[0]} must be a positive integer or "auto", got {describe(samples)}')
    if seed is not None and (type(seed) is not int or not 0 <= seed <= SEED_MAX):
        raise ApiError(422, f"{names[1]} must be an integer from 0 to 2**63-1, got {describe(seed)}")
    if tolerance is not None and (type(tolerance) not in (int, float) or not 0 < tolerance <= 1):
        raise ApiError(422, f"{names[2]} must be a number above 0 and at most 1, got {describe(tolerance)}")
    if tolerance is not None and samples != AUTO:
        raise ApiError(422, f'{names[2]}: only with {names[0]} "auto"')
    pairs = zip(level_names, (alpha, risk), strict=True)
    alpha, risk = (None if value is None else _level(name, value) for name, value in pairs)
    return MonteCarlo(samples, seed, return_samples, None if tolerance is None else float(tolerance), alpha, risk)


def _level(name: str, value: Any) -> float:
    try:
        return conformal.check_level(name, value)
    except ValueError as error:
        raise ApiError(422, str(error)) from None
