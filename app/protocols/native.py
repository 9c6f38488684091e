"""dropout-serve's own API: ``/predict``, ``/predict/mc-dropout``, ``/models``, ``/health``.

Bodies are read with orjson and checked by the pydantic models in ``app.schemas`` (strict: an
unknown field is a 422 that names it); the routes document those models through
``openapi_extra`` because they read the body themselves, which is the lean path.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from app import inference
from app.context import annotate
from app.limits import check_mc_enabled, check_return_samples
from app.loading import ServedModel
from app.protocols.body import json_body_schema, json_response, may_hold_booleans, read_json, validate
from app.registry import Registry
from app.schemas import (
    ErrorResponse,
    MCDropoutRequest,
    MCDropoutResponse,
    ModelInfo,
    ModelVersion,
    PredictRequest,
    PredictResponse,
)
from app.settings import Settings
from training import signatures
from training.uncertainty import ClassificationSummary, RegressionSummary

router = APIRouter()

REQUEST_MODELS = (PredictRequest, MCDropoutRequest)
"""Documented in the OpenAPI components although no route takes them as a parameter."""

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body is not valid JSON"},
    404: {"model": ErrorResponse, "description": "unknown model or version, or no model loaded"},
    413: {"model": ErrorResponse, "description": "the body is larger than DROPOUT_SERVE_MAX_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "the body is not sent as application/json"},
    422: {"model": ErrorResponse, "description": "the body breaks the schema, the model's input shape or a limit"},
}


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _settings(request: Request) -> Settings:
    return request.app.state.settings


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
    annotate(request, instances=len(body.instances))
    inference.check_instances(len(body.instances), _settings(request))
    with _registry(request).lease(body.model, body.version) as model:
        annotate(request, model=model.name, version=model.version)
        batch = inference.to_array(body.instances, model.input_shape, may_hold_booleans(raw))
        outputs = await inference.predict(model, batch)
        return json_response(_answer(model, _predictions(model, outputs)))


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
    settings = _settings(request)
    check_mc_enabled(settings)
    data, raw = await read_json(request)
    body = validate(MCDropoutRequest, data)
    annotate(request, instances=len(body.instances))
    inference.check_instances(len(body.instances), settings)
    with _registry(request).lease(body.model, body.version) as model:
        annotate(request, model=model.name, version=model.version)
        samples = inference.check_mc(model, len(body.instances), body.samples, settings)
        annotate(request, samples=samples)
        if body.return_samples:
            check_return_samples(settings, samples, len(body.instances), model.output_shape)
        batch = inference.to_array(body.instances, model.input_shape, may_hold_booleans(raw))
        seed = secrets.randbits(63) if body.seed is None else body.seed

        def summarize(draws: signatures.Samples) -> Response:  # up to 0.2 s for the largest T x N: not on the loop
            predictions = _mc_predictions(model, draws, body.return_samples)
            return json_response(_answer(model, predictions, samples=samples, seed=seed))

        return await inference.sample(model, batch, samples, seed, summarize)


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


def _mc_predictions(model: ServedModel, sampled: signatures.Samples, return_samples: bool) -> list[dict[str, Any]]:
    count = sampled.outputs.shape[1]
    s = inference.summarize(model, sampled)
    if isinstance(s, ClassificationSummary):
        labels = model.class_labels
        answers = [
            {
                "label": labels[s.label[i]],
                "probability": float(s.probability[i]),
                "probabilities": s.mean[i].tolist(),
                "std": s.std[i].tolist(),
                "predictive_entropy": float(s.predictive_entropy[i]),
                "expected_entropy": float(s.expected_entropy[i]),
                "mutual_information": float(s.mutual_information[i]),
                "variation_ratio": float(s.variation_ratio[i]),
            }
            for i in range(count)
        ]
    elif isinstance(s, RegressionSummary):
        answers = [s.answer(i) for i in range(count)]
    else:
        draws = sampled.outputs.astype(np.float64)
        mean, std = draws.mean(axis=0), draws.std(axis=0)
        answers = [{"mean": mean[i].tolist(), "std": std[i].tolist()} for i in range(count)]
    if return_samples:
        draws = sampled.outputs.astype(np.float64)
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
        metrics=meta.metrics if meta else {},
        created_at=meta.created_at.isoformat() if meta else None,
    )


def _model_info(registry: Registry, name: str) -> ModelInfo:
    versions = registry.versions(name)
    return ModelInfo(
        name=name,
        default=name == registry.default,
        latest=max(versions),
        versions=[_version_info(versions[v]) for v in sorted(versions)],
        labels=registry.labels(name),
    )


@router.get("/models", response_model=list[ModelInfo], tags=["models"])
async def list_models(request: Request) -> list[ModelInfo]:
    registry = _registry(request)
    return [_model_info(registry, name) for name in registry.names()]


@router.get("/models/{name}", response_model=ModelInfo, responses={404: _ERRORS[404]}, tags=["models"])
async def get_model(name: str, request: Request) -> ModelInfo:
    return _model_info(_registry(request), name)


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    """The process is up."""
    return {"status": "alive"}


@router.get(
    "/health/ready", tags=["health"], responses={503: {"description": "no version of the default model serves"}}
)
async def ready(request: Request) -> Response:
    """200 while at least one version of the default model is loaded and warmed up."""
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None or not registry.ready():
        return json_response({"status": "not ready", "models": 0 if registry is None else len(registry)}, 503)
    return json_response({"status": "ready", "models": len(registry)})
