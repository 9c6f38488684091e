"""Open Inference Protocol v2 (KServe, Triton, MLServer) over the core, with MC dropout through it.

A thin adapter: ``v2_codec`` reads and writes the wire format, the registry leases models and
``app.inference`` runs them; this module maps between them and the protocol's names.

- A model has one input, named by its SavedModel's input key (``inputs`` for models exported
  here), shaped ``[-1, *instance shape]``; the request must use that name (as Triton does), in
  any numeric datatype (converted to float32). Inference answers one output named by the output
  key (``outputs``), FP32.
- Request ``parameters`` ``{"mc_dropout": true, "samples": T, "seed": s}`` run Monte-Carlo dropout
  instead; the outputs are the summaries of ``training.uncertainty`` (FP64, as the native
  ``/predict/mc-dropout`` computes them) and the response ``parameters`` state T and the seed.
- Errors are ``{"error": ...}``: 400 for a bad request (also where the native API says 422, as
  Triton maps invalid arguments), 404 for an unknown model or version, 503 for not ready.
"""

from __future__ import annotations

import secrets
from functools import partial
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app import inference
from app.context import annotate
from app.errors import ApiError
from app.limits import check_mc_enabled
from app.loading import ServedModel
from app.protocols import v2_codec as codec
from app.protocols import v2_schemas as docs
from app.protocols.body import body_bytes
from app.registry import Registry
from app.settings import Settings
from training import artifact, signatures
from training.uncertainty import ClassificationSummary, RegressionSummary

router = APIRouter(prefix="/v2", tags=["v2 (KServe, Triton)"])

PLATFORM = "tensorflow_savedmodel"
EXTENSIONS = ["binary_tensor_data", "model_repository", "mc_dropout"]
SEED_MAX = 2**63 - 1
MC_OUTPUTS = {
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
"""Output tensors of an MC-dropout request, by task (None: a SavedModel without metadata)."""

_MC_PARAMETERS = {"mc_dropout", "samples", "seed"}
_ACCEPTED_PARAMETERS = {"binary_data_output", "priority", "timeout"}
"""Besides the MC ones: the binary extension's, and Triton's scheduling hints (one queue here, so no effect)."""
_REPOSITORY_STATES = {"AVAILABLE": "READY", "START": "LOADING", "LOADING": "LOADING", "UNLOADING": "UNLOADING"}


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _version(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise ApiError(400, f"model version must be a positive integer, got {text!r}")
    return int(text)


@router.get("", response_model=docs.ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "dropout-serve", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", response_model=docs.Live, summary="Server live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", response_model=docs.Ready, summary="Server ready", responses={503: {"model": docs.Ready}})
async def ready(request: Request) -> JSONResponse:
    """200 while a version of the default model serves, else 503."""
    registry: Registry | None = getattr(request.app.state, "registry", None)
    is_ready = registry is not None and registry.ready()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}", response_model=docs.ModelMetadata, responses=docs.ERRORS, summary="Model metadata")
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", response_model=docs.ModelMetadata, responses=docs.ERRORS)
async def version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return _metadata(request, name, _version(version))


def _metadata(request: Request, name: str, version: int | None) -> dict[str, Any]:
    registry = _registry(request)
    model = registry.get(name, version)
    return {
        "name": model.name,
        "versions": [str(s.version) for s in registry.status(name) if s.state == "AVAILABLE"],
        "platform": PLATFORM,
        "inputs": [{"name": model.input_key, "datatype": "FP32", "shape": [-1, *model.input_shape]}],
        "outputs": [{"name": model.output_key, "datatype": "FP32", "shape": [-1, *model.output_shape]}],
        "parameters": {
            "task": model.task or "",
            "mc_dropout": model.mc_dropout is not None,
            "mc_dropout_outputs": ",".join(_mc_outputs(model)) if model.mc_dropout is not None else "",
        },
    }


_NOT_READY = {503: {"model": docs.ModelReady, "description": "known, but not (yet or any more) serving"}}


@router.get("/models/{name}/ready", response_model=docs.ModelReady, responses={**docs.ERRORS, **_NOT_READY})
async def model_ready(request: Request, name: str) -> JSONResponse:
    """200 if the model serves, 503 if it is known but not (yet or any more) serving."""
    return _ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready", response_model=docs.ModelReady, responses={**docs.ERRORS, **_NOT_READY}
)
async def version_ready(request: Request, name: str, version: str) -> JSONResponse:
    return _ready(request, name, _version(version))


def _ready(request: Request, name: str, number: int | None) -> JSONResponse:
    states = {s.version: s.state for s in _registry(request).status(name)}  # 404 for an unknown model
    serving = [v for v, state in states.items() if state == "AVAILABLE"]
    is_ready = number in serving if number is not None else bool(serving)
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


@router.post(
    "/models/{name}/infer",
    response_model=docs.InferResponse,
    responses=docs.INFER_ERRORS,
    openapi_extra=docs.INFER_OPENAPI,
    summary="Inference, or MC dropout with parameters.mc_dropout",
)
async def infer(request: Request, name: str) -> Response:
    """Typed tensors in JSON or binary (``Inference-Header-Content-Length``), answered the same way."""
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=docs.InferResponse,
    responses=docs.INFER_ERRORS,
    openapi_extra=docs.INFER_OPENAPI,
)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, _version(version))


async def _infer(request: Request, name: str, number: int | None) -> Response:
    settings = _settings(request)
    body = codec.decompress(await body_bytes(request), request.headers.get("content-encoding"), settings.max_body_bytes)
    parsed = codec.parse_infer_request(body, request.headers.get(codec.HEADER_LENGTH))
    mc = _mc_parameters(parsed.parameters)
    if mc is not None:
        check_mc_enabled(settings)
    with _registry(request).lease(name, number) as model:
        annotate(request, model=model.name, version=model.version)
        batch = _batch(model, parsed.inputs, settings)
        annotate(request, instances=len(batch))
        names = [model.output_key] if mc is None else _mc_outputs(model)
        wanted = _requested(parsed, names, mc is not None)
        if mc is None:
            outputs = {model.output_key: await inference.predict(model, batch)}
            parameters = {}
        else:
            samples = inference.check_mc(model, len(batch), mc[0], settings)
            annotate(request, samples=samples)
            seed = secrets.randbits(63) if mc[1] is None else mc[1]
            outputs = await inference.sample(model, batch, samples, seed, partial(_summaries, model))
            parameters = {"mc_dropout": True, "samples": samples, "seed": seed}
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if parsed.id is not None:
        header["id"] = parsed.id
    if parameters:
        header["parameters"] = parameters
    content, length = codec.encode_infer_response(header, [codec.OutputTensor(n, outputs[n], b) for n, b in wanted])
    if length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={codec.HEADER_LENGTH: str(length)})


def _mc_parameters(parameters: codec.Parameters) -> tuple[int | None, int | None] | None:
    """(samples, seed) for an MC-dropout request, None for inference; refuses unknown parameters."""
    for key in parameters:
        if key not in _MC_PARAMETERS | _ACCEPTED_PARAMETERS:
            known = ", ".join(sorted(_MC_PARAMETERS | _ACCEPTED_PARAMETERS))
            raise ApiError(400, f"parameters.{key}: unknown parameter; known: {known}")
    mc = parameters.get("mc_dropout", False)
    if not isinstance(mc, bool):
        raise ApiError(400, f"parameters.mc_dropout: expected true or false, got {mc!r}")
    samples, seed = parameters.get("samples"), parameters.get("seed")
    if not mc:
        if samples is not None or seed is not None:
            raise ApiError(400, "parameters.samples and parameters.seed need parameters.mc_dropout: true")
        return None
    if samples is not None and (type(samples) is not int or samples < 1):
        raise ApiError(400, f"parameters.samples: expected a positive integer, got {samples!r}")
    if seed is not None and (type(seed) is not int or not 0 <= seed <= SEED_MAX):
        raise ApiError(400, f"parameters.seed: expected an integer from 0 to 2**63-1, got {seed!r}")
    return samples, seed


def _batch(model: ServedModel, inputs: list[codec.InputTensor], settings: Settings) -> np.ndarray:
    """The one input as a float32 batch ``[N, *input_shape]``."""
    where = f"model {model.name!r} version {model.version}"
    if len(inputs) != 1 or inputs[0].name != model.input_key:
        got = ", ".join(repr(t.name) for t in inputs)
        raise ApiError(400, f"{where} takes one input, {model.input_key!r}; got {got}")
    tensor = inputs[0]
    expected = [-1, *model.input_shape]
    shape = tensor.array.shape
    if len(shape) != len(expected) or shape[1:] != model.input_shape or shape[0] == 0:
        raise ApiError(
            400, f"input {tensor.name!r}: shape {list(shape)} does not match {expected} of {where} (N >= 1 rows)"
        )
    inference.check_instances(shape[0], settings)
    if tensor.datatype == "BOOL":
        raise ApiError(400, f"input {tensor.name!r}: datatype BOOL; send numbers (FP32, FP64, INT*, UINT*)")
    with np.errstate(over="ignore"):
        batch = tensor.array.astype(np.float32)
    if not np.isfinite(batch).all():
        position = [int(i) for i in np.argwhere(~np.isfinite(batch))[0]]
        raise ApiError(400, f"input {tensor.name!r}: value at {position} is NaN, infinite or beyond float32's range")
    return batch


def _mc_outputs(model: ServedModel) -> list[str]:
    names = MC_OUTPUTS[model.task]
    noise = model.tau is not None or (model.metadata is not None and model.metadata.likelihood == "heteroscedastic")
    return [n for n in names if n != "aleatoric_std"] if model.task == "regression" and not noise else names


def _requested(parsed: codec.InferRequest, names: list[str], mc: bool) -> list[tuple[str, bool]]:
    """(name, binary) of each output to send, in the order asked; all of them if none is named."""
    if parsed.outputs is None:
        return [(name, parsed.binary_output) for name in names]
    for output in parsed.outputs:
        if output.name not in names:
            kind = "an MC-dropout" if mc else "an inference"
            raise ApiError(400, f"unknown output {output.name!r}; {kind} request has: {', '.join(names)}")
    return [(output.name, output.binary) for output in parsed.outputs]


def _summaries(model: ServedModel, sampled: signatures.Samples) -> dict[str, np.ndarray]:
    """MC summaries as tensors, from the same functions as the native ``/predict/mc-dropout``."""
    s = inference.summarize(model, sampled)
    if isinstance(s, ClassificationSummary):
        return {
            "probabilities": s.mean,
            "std": s.std,
            "predictive_entropy": s.predictive_entropy,
            "expected_entropy": s.expected_entropy,
            "mutual_information": s.mutual_information,
            "variation_ratio": s.variation_ratio,
        }
    if isinstance(s, RegressionSummary):
        shape = sampled.outputs.shape[1:]
        tensors = {
            "mean": s.mean,
            "epistemic_std": s.epistemic_std,
            "total_std": s.total_std,
            "interval_lower": s.lower,
            "interval_upper": s.upper,
        }
        if s.aleatoric_std is not None:
            tensors["aleatoric_std"] = np.broadcast_to(s.aleatoric_std, s.total_std.shape)  # one value or per instance
        return {name: value.reshape(shape) for name, value in tensors.items()}
    draws = sampled.outputs.astype(np.float64)
    return {"mean": draws.mean(axis=0), "std": draws.std(axis=0)}


@router.post(
    "/repository/index",
    response_model=list[docs.RepositoryModel],
    response_model_exclude_none=True,
    summary="Model repository index",
)
async def repository_index(request: Request) -> list[dict[str, str]]:
    """Every model of the repository, each version the registry tracks with its state.

    Body ``{"ready": true}`` for the serving versions only. A model in the repository that the
    registry does not track (unloaded on request, or not scanned yet) is listed without a version.
    """
    options = _json_body(await request.body(), "index request")
    only_ready = options.get("ready", False)
    if not isinstance(only_ready, bool):
        raise ApiError(400, f"ready: expected true or false, got {only_ready!r}")
    registry = _registry(request)
    tracked = registry.known()
    index = []
    for name in sorted(set(tracked) | set(artifact.model_names(_settings(request).model_dir))):
        if name not in tracked:
            if not only_ready:
                index.append({"name": name, "state": "UNAVAILABLE", "reason": "not loaded"})
            continue
        for status in registry.status(name):
            state = _REPOSITORY_STATES.get(status.state, "UNAVAILABLE")
            if not only_ready or state == "READY":
                index.append(
                    {"name": name, "version": str(status.version), "state": state, "reason": status.error or ""}
                )
    return index


@router.post("/repository/models/{name}/load", responses=docs.ERRORS, summary="Load a model")
async def repository_load(request: Request, name: str) -> Response:
    """Serve ``name`` again after an unload and load its versions now; 400 if none of them loads."""
    parameters = _json_body(await request.body(), "load request").get("parameters") or {}
    if parameters:
        raise ApiError(
            400, f"load parameters ({', '.join(parameters)}) are not supported; the repository is the config"
        )
    registry = _registry(request)
    await run_in_threadpool(registry.load_model, name)
    statuses = registry.status(name)
    if not any(s.state == "AVAILABLE" for s in statuses):
        errors = "; ".join(f"version {s.version}: {s.error}" for s in statuses if s.error) or "no loadable version"
        raise ApiError(400, f"failed to load {name!r}: {errors}")
    return JSONResponse({})


@router.post("/repository/models/{name}/unload", responses=docs.ERRORS, summary="Unload a model")
async def repository_unload(request: Request, name: str) -> Response:
    """Stop serving ``name`` (in-flight requests finish) until it is loaded again; the watcher leaves it alone."""
    parameters = _json_body(await request.body(), "unload request").get("parameters") or {}
    unknown = sorted(set(parameters) - {"unload_dependents"})
    if unknown:
        raise ApiError(400, f"parameters.{unknown[0]}: unknown unload parameter; known: unload_dependents")
    _registry(request).unload_model(name)
    return JSONResponse({})


def _json_body(body: bytes, what: str) -> dict[str, Any]:
    """An optional JSON object body (tritonclient sends an empty one for the index)."""
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict) or not isinstance(value.get("parameters", {}), dict):
        raise ApiError(400, f"the {what} must be a JSON object (with an object 'parameters', if any)")
    return value
