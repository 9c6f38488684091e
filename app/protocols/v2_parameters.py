"""The Open Inference Protocol's request ``parameters``, read alike by the REST and gRPC v2 doors.

``{"mc_dropout": true, "samples": T, "seed": s}`` asks for Monte-Carlo dropout (``"samples": "auto"``, with
an optional ``"tolerance"``, samples each instance until its answer is settled); the others this server
knows are accepted without effect on the answer (the binary extension's, Triton's scheduling hints).
Both doors hand this module the parameters as plain values (JSON, or gRPC's ``InferParameter``
unwrapped), so they agree on every answer and message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.dataplane import MonteCarlo, monte_carlo
from app.errors import ApiError

MC_PARAMETERS = frozenset({"mc_dropout", "samples", "seed", "tolerance"})
ACCEPTED_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout"})
"""Besides the MC ones: the binary extension's, and Triton's scheduling hints (one queue here, so no effect)."""


def mc_parameters(parameters: Mapping[str, Any]) -> MonteCarlo | None:
    """The MC request the parameters ask for, None for inference; a 400 naming a parameter it cannot take."""
    for key in parameters:
        if key not in MC_PARAMETERS | ACCEPTED_PARAMETERS:
            known = ", ".join(sorted(MC_PARAMETERS | ACCEPTED_PARAMETERS))
            raise ApiError(400, f"parameters.{key}: unknown parameter; known: {known}")
    mc = parameters.get("mc_dropout", False)
    if not isinstance(mc, bool):
        raise ApiError(400, f"parameters.mc_dropout: expected true or false, got {mc!r}")
    samples, seed, tolerance = parameters.get("samples"), parameters.get("seed"), parameters.get("tolerance")
    if not mc:
        if samples is not None or seed is not None or tolerance is not None:
            raise ApiError(
                400, "parameters.samples, parameters.seed and parameters.tolerance need parameters.mc_dropout: true"
            )
        return None
    names = ("parameters.samples", "parameters.seed", "parameters.tolerance")
    return monte_carlo(samples, seed, tolerance=tolerance, names=names)
