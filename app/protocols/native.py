"""dropout-serve's own API: ``/predict``, ``/predict/mc-dropout``, ``/models``, ``/health``.

Bodies are read with orjson and checked by the pydantic models in ``app.schemas`` (strict: an
unknown field is a 422 that names it); the routes document those models through
``openapi_extra`` because they read the body themselves, which is the lean path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from app.context import record_of
from app.dataplane import DataPlane, InferRequest, InferResult, monte_carlo
from app.loading import ServedModel
from app.protocols.body import dataplane, json_body_schema, json_response, may_hold_booleans, read_json, validate
from app.schemas import (
    ErrorResponse,
    MCDropoutRequest,
    MCDropoutResponse,
    ModelInfo,
    ModelVersion,
    PredictRequest,
    PredictResponse,
)
from app.summaries import SAMPLES_USED, ConformalAnswer, RawSummary
from training import conformity
from training.uncertainty import ClassificationSummary

router = APIRouter()

REQUEST_MODELS = (PredictRequest, MCDropoutRequest)
"""Documented in the OpenAPI components although no route takes them as a parameter."""

_MC_NAMES = ("samples", "seed", "tolerance")
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body is not valid JSON"},
    404: {"model": ErrorResponse, "description": "unknown model or version, or no model loaded"},
    413: {"model": ErrorResponse, "description": "the body is larger than DROPOUT_SERVE_MAX_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "the body is not sent as application/json"},
    422: {"model": ErrorResponse, "description": "the body breaks the schema, the model's input shape or a limit"},
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=json_body_schema(PredictRequest),
    tags=["predict"],
)
async def predict(request: Request) -> Response:
    """Inference-mode prediction (dropout off), as Keras' ``model(x, training=False)``."""
    data, raw = await read_json(request)
    body = validate(PredictRequest, data)
    call = InferRequest(
        body.instances, body.model, body.version, booleans=may_hold_booleans(raw), record=record_of(request.scope)
    )
    result = await dataplane(request).infer(call)
    return json_response(_answer(result.model, _predictions(result.model, result.outputs)))


@router.post(
    "/predict/mc-dropout",
    response_model=MCDropoutResponse,
    responses=_ERRORS,
    openapi_extra=json_body_schema(MCDropoutRequest),
    tags=["predict"],
)
async def predict_mc_dropout(request: Request) -> Response:
    """Monte-Carlo dropout: T stochastic passes with dropout on, summarized per instance.

    The response states T and the seed; sending the same instances, T and seed again
    returns the identical answer, from any replica, before or after a restart.
    """
    data, raw = await read_json(request)
    body = validate(MCDropoutRequest, data)
    call = InferRequest(
        body.instances,
        body.model,
        body.version,
        mc=monte_carlo(
            body.samples,
            body.seed,
            body.return_samples,
            body.tolerance,
            names=_MC_NAMES,
            alpha=body.alpha,
            risk=body.risk,
        ),
        booleans=may_hold_booleans(raw),
        record=record_of(request.scope),
        encode=_mc_answer,  # up to 0.2 s for the largest T x N: in the MC worker thread, not on the loop
    )
    return (await dataplane(request).infer(call)).encoded


def _mc_answer(result: InferResult) -> Response:
    model, conformal = result.model, result.conformal
    predictions = _mc_predictions(result)
    extra: dict[str, Any] = {"samples": result.samples, "seed": result.seed}
    if result.samples_used is not None:  # samples "auto": each prediction's own T
        extra["tolerance"] = result.tolerance
        for prediction, used in zip(predictions, result.samples_used.tolist(), strict=True):
            prediction[SAMPLES_USED] = used
    if conformal is not None:
        extra["alpha"] = conformal.alpha
        if conformal.risk is not None:
            extra["risk"] = conformal.risk
        if conformal.note is not None:
            extra["conformal_note"] = conformal.note
        _add_conformal(predictions, conformal, model.class_labels)
    return json_response(_answer(model, predictions, **extra))


def _add_conformal(answers: list[dict[str, Any]], conformal: ConformalAnswer, labels: list[str] | None) -> None:
    """Each instance's prediction set and abstention, or its conformal interval (beside ``interval_95``)."""
    if conformal.prediction_set is not None:  # whole columns to Python at once: NumPy per instance costs more
        sets, abstain = conformal.prediction_set.tolist(), conformal.abstain.tolist()
        for answer, members, abstains in zip(answers, sets, abstain, strict=True):
            answer["prediction_set"] = [label for label, member in zip(labels, members, strict=True) if member]
            answer["abstain"] = abstains
        return
    for i, answer in enumerate(answers):
        answer["interval"] = [_scalar_or_list(conformal.lower[i]), _scalar_or_list(conformal.upper[i])]


def _answer(model: ServedModel, predictions: list[dict], **extra) -> dict:
    labels = {"class_labels": model.class_labels} if model.task == "classification" else {}
    return {"model": model.name, "version": model.version, **extra, **labels, "predictions": predictions}


def _scalar_or_list(values: np.ndarray) -> float | list:
    return float(values[0]) if values.shape == (1,) else values.tolist()


def _predictions(model: ServedModel, outputs: np.ndarray) -> list[dict[str, Any]]:
    outputs = outputs.astype(np.float64)
    if model.task == "classification":
        labels = model.class_labels
        best = outputs.argmax(axis=-1).tolist()
        return [
            {"label": labels[k], "probability": p[k], "probabilities": p}
            for k, p in zip(best, outputs.tolist(), strict=True)
        ]
    if model.task == "regression":
        return [{"value": _scalar_or_list(row.reshape(-1))} for row in outputs]
    return [{"outputs": row.tolist()} for row in outputs]


def _mc_predictions(result: InferResult) -> list[dict[str, Any]]:
    s = result.summary
    if isinstance(s, ClassificationSummary):
        labels = result.model.class_labels
        columns = (s.label, s.probability, s.mean, s.std, s.predictive_entropy, s.expected_entropy)
        columns += (s.mutual_information, s.variation_ratio)
        answers = [
            {
                "label": labels[label],
                "probability": probability,
                "probabilities": mean,
                "std": std,
                "predictive_entropy": total,
                "expected_entropy": expected,
                "mutual_information": mutual,
                "variation_ratio": variation,
            }  # each column to Python in one tolist: the same floats as float() of each value
            for label, probability, mean, std, total, expected, mutual, variation in zip(
                *(column.tolist() for column in columns), strict=True
            )
        ]
    elif isinstance(s, RawSummary):
        answers = [{"mean": mean.tolist(), "std": std.tolist()} for mean, std in zip(s.mean, s.std, strict=True)]
    else:
        answers = [s.answer(i) for i in range(len(s.mean))]
    if result.draws is not None:
        draws = result.draws.outputs.astype(np.float64)
        for i, answer in enumerate(answers):
            answer["samples"] = draws[:, i].tolist()
    return answers


def _version_info(model: ServedModel) -> ModelVersion:
    meta = model.metadata
    return ModelVersion(
        version=model.version,
        task=model.task,
        input_shape=list(model.input_shape),
        output_shape=list(model.output_shape),
        class_labels=model.class_labels,
        dropout_layers=[layer.model_dump() for layer in meta.dropout_layers] if meta else [],
        mc_dropout=model.mc_dropout is not None,
        tau=model.tau,
        **_conformal_info(model),
        metrics=meta.metrics if meta else {},
        created_at=meta.created_at.isoformat() if meta else None,
    )


def _conformal_info(model: ServedModel) -> dict[str, Any]:
    """The calibration behind the conformal fields (not its scores), or why the version has none."""
    reason = conformity.unavailable(model.metadata) if model.task is not None else "the model has no task"
    if reason is not None:
        return {"conformal_unavailable": reason}
    c = model.metadata.conformal
    facts = c.model_dump(include={"rows", "source", "score", "uncertainty", "samples", "seed", "default_risk", "delta"})
    return {"conformal": {key: value for key, value in facts.items() if value is not None}}


def _model_info(plane: DataPlane, name: str) -> ModelInfo:
    versions = plane.versions(name)
    return ModelInfo(
        name=name,
        default=name == plane.default,
        latest=max(versions),
        versions=[_version_info(versions[v]) for v in sorted(versions)],
        labels=plane.labels(name),
    )


@router.get("/models", response_model=list[ModelInfo], tags=["models"])
async def list_models(request: Request) -> list[ModelInfo]:
    plane = dataplane(request)
    return [_model_info(plane, name) for name in plane.names()]


@router.get("/models/{name}", response_model=ModelInfo, responses={404: _ERRORS[404]}, tags=["models"])
async def get_model(name: str, request: Request) -> ModelInfo:
    return _model_info(dataplane(request), name)


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    """The process is up."""
    return {"status": "alive"}


@router.get(
    "/health/ready", tags=["health"], responses={503: {"description": "no version of the default model serves"}}
)
async def ready(request: Request) -> Response:
    """200 while at least one version of the default model is loaded and warmed up."""
    plane: DataPlane | None = dataplane(request)
    if plane is None or not plane.ready():
        return json_response({"status": "not ready", "models": 0 if plane is None else plane.loaded()}, 503)
    return json_response({"status": "ready", "models": plane.loaded()})
