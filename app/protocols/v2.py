"""Open Inference Protocol v2 (KServe, Triton, MLServer) over the core, with MC dropout through it.

A thin adapter: ``v2_codec`` reads and writes the wire format, ``v2_parameters`` reads the request
parameters (shared with the gRPC door) and ``app.dataplane`` runs the request; this module maps
between them and the protocol's names.

- A model has one input, named by its SavedModel's input key (``inputs`` for models exported
  here), shaped ``[-1, *instance shape]``; the request must use that name (as Triton does), in
  any numeric datatype (converted to float32). Inference answers one output named by the output
  key (``outputs``), FP32.
- Request ``parameters`` ``{"mc_dropout": true, "samples": T, "seed": s}`` run Monte-Carlo dropout
  instead; the outputs are the summaries of ``training.uncertainty`` (FP64, as the native
  ``/predict/mc-dropout`` computes them) and the response ``parameters`` state T and the seed.
  ``"samples": "auto"`` (optional ``"tolerance"``) samples each instance until its answer is settled;
  the answer adds ``samples_used`` (INT64, each instance's T) and the tolerance to the parameters.
- Errors are ``{"error": ...}``: 400 for a bad request (also where the native API says 422, as
  Triton maps invalid arguments), 404 for an unknown model or version, 503 for not ready.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app.context import record_of
from app.dataplane import DataPlane, InferRequest, RepositoryEntry
from app.errors import ApiError, describe
from app.protocols import v2_codec as codec
from app.protocols import v2_schemas as docs
from app.protocols.body import body_bytes, dataplane
from app.protocols.v2_parameters import answer, input_name, mc_parameters
from app.summaries import output_names

router = APIRouter(prefix="/v2", tags=["v2 (KServe, Triton)"])

PLATFORM = "tensorflow_savedmodel"
EXTENSIONS = ["binary_tensor_data", "model_repository", "mc_dropout"]
REPOSITORY_STATES = {"AVAILABLE": "READY", "START": "LOADING", "LOADING": "LOADING", "UNLOADING": "UNLOADING"}


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
    plane: DataPlane | None = dataplane(request)
    is_ready = plane is not None and plane.ready()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}", response_model=docs.ModelMetadata, responses=docs.ERRORS, summary="Model metadata")
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _metadata(dataplane(request), name, None)


@router.get("/models/{name}/versions/{version}", response_model=docs.ModelMetadata, responses=docs.ERRORS)
async def version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return _metadata(dataplane(request), name, _version(version))


def _metadata(plane: DataPlane, name: str, version: int | None) -> dict[str, Any]:
    model = plane.model(name, version)
    return {
        "name": model.name,
        "versions": [str(v) for v in sorted(plane.versions(name))],
        "platform": PLATFORM,
        "inputs": [{"name": model.input_key, "datatype": "FP32", "shape": [-1, *model.input_shape]}],
        "outputs": [{"name": model.output_key, "datatype": "FP32", "shape": [-1, *model.output_shape]}],
        "parameters": {
            "task": model.task or "",
            "mc_dropout": model.mc_dropout is not None,
            "mc_dropout_outputs": ",".join(output_names(model, mc=True)) if model.mc_dropout is not None else "",
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
    is_ready = dataplane(request).model_ready(name, number)  # 404 for an unknown model
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
    plane = dataplane(request)
    parsed = codec.parse_infer_request(await body_bytes(request), request.headers.get(codec.HEADER_LENGTH))
    if len(parsed.inputs) != 1:
        got = ", ".join(repr(t.name) for t in parsed.inputs)
        raise ApiError(400, f"model {name!r} takes one input; got {got}")
    tensor = parsed.inputs[0]
    call = InferRequest(
        tensor.array,
        name,
        number,
        mc=mc_parameters(parsed.parameters),
        where=f"input {tensor.name!r}",
        input_name=input_name(parsed.parameters, tensor.name),
        outputs=None if parsed.outputs is None else [output.name for output in parsed.outputs],
        record=record_of(request.scope),
    )
    result = await plane.infer(call)
    model = result.model
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if parsed.id is not None:
        header["id"] = parsed.id
    outputs, parameters, names = answer(result)
    if parameters:
        header["parameters"] = parameters
    if parsed.outputs is None:
        wanted = [(n, parsed.binary_output) for n in names]
    else:
        wanted = [(output.name, output.binary) for output in parsed.outputs]
    content, length = codec.encode_infer_response(header, [codec.OutputTensor(n, outputs[n], b) for n, b in wanted])
    if length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={codec.HEADER_LENGTH: str(length)})


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
    options = _json_body(await body_bytes(request), "index request")
    only_ready = options.get("ready", False)
    if not isinstance(only_ready, bool):
        raise ApiError(400, f"ready: expected true or false, got {describe(only_ready)}")
    return [_index_entry(entry) for entry in dataplane(request).index(only_ready)]


def _index_entry(entry: RepositoryEntry) -> dict[str, str]:
    state = REPOSITORY_STATES.get(entry.state, "UNAVAILABLE")
    if entry.version is None:
        return {"name": entry.name, "state": state, "reason": entry.reason}
    return {"name": entry.name, "version": str(entry.version), "state": state, "reason": entry.reason}


@router.post("/repository/models/{name}/load", responses=docs.ERRORS, summary="Load a model")
async def repository_load(request: Request, name: str) -> Response:
    """Serve ``name`` again after an unload and load its versions now; 400 if none of them loads."""
    parameters = _json_body(await body_bytes(request), "load request").get("parameters") or {}
    if parameters:
        raise ApiError(
            400, f"load parameters ({', '.join(parameters)}) are not supported; the repository is the config"
        )
    await run_in_threadpool(dataplane(request).load, name)
    return JSONResponse({})


@router.post("/repository/models/{name}/unload", responses=docs.ERRORS, summary="Unload a model")
async def repository_unload(request: Request, name: str) -> Response:
    """Stop serving ``name`` (in-flight requests finish) until it is loaded again; the watcher leaves it alone."""
    parameters = _json_body(await body_bytes(request), "unload request").get("parameters") or {}
    unknown = sorted(set(parameters) - {"unload_dependents"})
    if unknown:
        raise ApiError(400, f"parameters.{unknown[0]}: unknown unload parameter; known: unload_dependents")
    dataplane(request).unload(name)
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
