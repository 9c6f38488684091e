"""The Open Inference Protocol's request ``parameters``, read alike by the REST and gRPC v2 doors.

Parameters are the protocol's extension point, and other servers' clients send their own: MLServer's
codecs ``content_type``, Triton's ``priority`` and ``timeout``, KServe's custom ones. So a parameter
this server does not know is ignored, never refused (unknown *fields* of the body still are). The
ones it knows: ``{"mc_dropout": true, "samples": T, "seed": s}`` ask for Monte-Carlo dropout,
checked strictly (``"samples": "auto"``, with an optional ``"tolerance"``, samples each instance until
its answer is settled); ``binary_data_output`` (the binary extension) is read by ``v2_codec``; the
shared-memory and classification extensions, which would change the answer's meaning, are refused
there. ``"alpha"`` and ``"risk"`` (with ``mc_dropout``) set the levels of a calibrated version's
``prediction_set``/``abstain`` or ``conformal_lower``/``conformal_upper`` outputs. Both doors hand this
module plain values (JSON, or gRPC's ``InferParameter`` unwrapped), so they agree on every answer and
message.

``content_type`` is honoured where it means something here: on the request, ``"np"`` (MLServer's
``NumpyRequestCodec``) says the request *is* one NumPy tensor, so its one input is taken whatever
its name (``input-1``, as that codec names it), as MLServer does; otherwise the input must carry
the model's input name, as Triton requires. On an input, every input is read as a NumPy tensor
anyway, so it changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from app.dataplane import InferResult, MonteCarlo, monte_carlo
from app.errors import ApiError, describe
from app.summaries import SAMPLES_USED, output_names, tensors

MC_PARAMETERS = frozenset({"mc_dropout", "samples", "seed", "tolerance", "alpha", "risk"})
ONE_TENSOR = "np"
"""The request ``content_type`` of MLServer's ``NumpyRequestCodec``: the whole request is one tensor."""


def input_name(parameters: Mapping[str, Any], name: str) -> str | None:
    """The input name the data plane should check against the model's; None when the name means nothing."""
    return None if parameters.get("content_type") == ONE_TENSOR else name


def mc_parameters(parameters: Mapping[str, Any]) -> MonteCarlo | None:
    """The MC request the parameters ask for, None for inference; a 400 naming an MC parameter it cannot take."""
    mc = parameters.get("mc_dropout", False)
    if not isinstance(mc, bool):
        raise ApiError(400, f"parameters.mc_dropout: expected true or false, got {describe(mc)}")
    samples, seed, tolerance = parameters.get("samples"), parameters.get("seed"), parameters.get("tolerance")
    alpha, risk = parameters.get("alpha"), parameters.get("risk")
    if not mc:
        if any(value is not None for value in (samples, seed, tolerance, alpha, risk)):
            raise ApiError(400, "parameters.samples, seed, tolerance, alpha and risk need parameters.mc_dropout: true")
        return None
    return monte_carlo(
        samples,
        seed,
        tolerance=tolerance,
        names=("parameters.samples", "parameters.seed", "parameters.tolerance"),
        alpha=alpha,
        risk=risk,
        level_names=("parameters.alpha", "parameters.risk"),
    )


def answer(result: InferResult) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """A result as the v2 doors answer it: the output tensors by name, the response parameters (an MC
    answer's T, seed, conformal levels and ``auto`` tolerance) and the names sent when none is asked for."""
    model = result.model
    if result.summary is None:
        return {model.output_key: result.outputs}, {}, [model.output_key]
    outputs = tensors(result.summary, model.output_shape, result.conformal)
    parameters: dict[str, Any] = {"mc_dropout": True, "samples": result.samples, "seed": result.seed}
    conformal = result.conformal
    if conformal is not None:  # the levels its outputs were made at, and why they are approximate, if so
        levels = {"alpha": conformal.alpha, "risk": conformal.risk, "conformal_note": conformal.note}
        parameters |= {key: value for key, value in levels.items() if value is not None}
    auto = result.samples_used is not None
    if auto:
        outputs[SAMPLES_USED] = result.samples_used
        parameters["tolerance"] = result.tolerance
    return outputs, parameters, output_names(model, True, auto)
