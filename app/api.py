"""HTTP routes. TensorFlow work runs in a worker thread so the event loop keeps serving."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app import inference
from app.context import annotate
from app.errors import ApiError
from app.limits import check_mc_enabled, check_return_samples
from app.registry import Registry, ServedModel
from app.schemas import (
    MCDropoutRequest,
    MCDropoutResponse,
    ModelInfo,
    ModelVersion,
    PredictRequest,
    PredictResponse,
)
from app.settings import Settings

router = APIRouter()


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _check_batch(body: PredictRequest, settings: Settings) -> None:
    if len(body.instances) > settings.max_instances:
        raise ApiError(
            422,
            f"instances: {len(body.instances)} given, at most {settings.max_instances} per request "
            "(DROPOUT_SERVE_MAX_INSTANCES)",
        )


@router.post("/predict", response_model=PredictResponse, tags=["predict"])
async def predict(body: PredictRequest, request: Request) -> JSONResponse:
    """Inference-mode prediction (dropout off), as Keras' ``model(x, training=False)``."""
    annotate(request, instances=len(body.instances))
    _check_batch(body, _settings(request))
    model = _registry(request).get(body.model, body.version)
    annotate(request, model=model.name, version=model.version)
    batch = inference.to_array(body.instances, model.input_shape)
    predictions = await run_in_threadpool(inference.predict, model, batch)
    return JSONResponse(_answer(model, predictions))


@router.post("/predict/mc-dropout", response_model=MCDropoutResponse, tags=["predict"])
async def predict_mc_dropout(body: MCDropoutRequest, request: Request) -> JSONResponse:
    """Monte-Carlo dropout: T stochastic passes with dropout on, summarized per instance.

    The response states T and the seed; sending the same instances, T and seed again
    returns the identical answer, from any replica, before or after a restart.
    """
    settings = _settings(request)
    check_mc_enabled(settings)
    samples = body.samples or settings.default_samples
    annotate(request, instances=len(body.instances), samples=samples)
    _check_batch(body, settings)
    if samples > settings.max_samples:
        raise ApiError(422, f"samples: {samples} asked, at most {settings.max_samples} (DROPOUT_SERVE_MAX_SAMPLES)")
    if samples * len(body.instances) > settings.max_mc_rows:
        raise ApiError(
            422,
            f"samples x instances = {samples * len(body.instances)}, at most {settings.max_mc_rows} per request "
            "(DROPOUT_SERVE_MAX_MC_ROWS); send fewer instances or samples",
        )
    model = _registry(request).get(body.model, body.version)
    if model.mc_dropout is None:
        raise ApiError(
            422,
            f"model {model.name!r} version {model.version} has no mc_dropout signature "
            "(it was not exported with dropout layers); use /predict",
        )
    annotate(request, model=model.name, version=model.version)
    if body.return_samples:
        check_return_samples(settings, samples, len(body.instances), model.output_shape)
    batch = inference.to_array(body.instances, model.input_shape)
    seed = secrets.randbits(63) if body.seed is None else body.seed
    predictions = await run_in_threadpool(inference.predict_mc, model, batch, samples, seed, body.return_samples)
    return JSONResponse(_answer(model, predictions, samples=samples, seed=seed))


def _answer(model: ServedModel, predictions: list[dict], **extra) -> dict:
    labels = {"class_labels": model.class_labels} if model.task == "classification" else {}
    return {"model": model.name, "version": model.version, **extra, **labels, "predictions": predictions}


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
    )


@router.get("/models", response_model=list[ModelInfo], tags=["models"])
async def list_models(request: Request) -> list[ModelInfo]:
    registry = _registry(request)
    return [_model_info(registry, name) for name in registry.names()]


@router.get("/models/{name}", response_model=ModelInfo, tags=["models"])
async def get_model(name: str, request: Request) -> ModelInfo:
    return _model_info(_registry(request), name)


@router.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    """The process is up."""
    return {"status": "alive"}


@router.get("/health/ready", tags=["health"], responses={503: {"description": "no model is loaded"}})
async def ready(request: Request) -> JSONResponse:
    """200 once at least one model is loaded and warmed up."""
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None or len(registry) == 0:
        return JSONResponse({"status": "not ready", "models": 0}, status_code=503)
    return JSONResponse({"status": "ready", "models": len(registry)})
