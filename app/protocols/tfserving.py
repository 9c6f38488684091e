"""TensorFlow Serving's REST API (2.x), so its clients can point at us unchanged.

``GET /v1/models/{m}[/versions/{v}|/labels/{l}]`` gives the version status,
``…/metadata`` the SignatureDefs (read from ``saved_model.pb`` and printed as TF Serving
prints them), and ``POST …:predict`` runs a signature in row (``instances``) or columnar
(``inputs``) format. ``signature_name: "mc_dropout"`` runs the artifact's MC signature with its
``samples`` and ``seed`` inputs and answers its raw samples ``[T, N, ...]`` (with ``variance`` and
a calibrated classifier's ``predictive`` as named outputs), exactly what TF Serving itself answers
for the same SavedModel. Errors are ``{"error": ...}`` with TF Serving's
status codes: an invalid argument is a 400, not a 422.
"""

from __future__ import annotations

from functools import cache, partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from google.protobuf import json_format
from pydantic import BaseModel, Field
from starlette.convertors import Convertor, register_url_convertor
from tensorflow.core.protobuf import saved_model_pb2

from app import inference
from app.context import annotate
from app.errors import ApiError
from app.limits import check_mc_enabled, check_return_samples
from app.loading import ServedModel
from app.protocols.body import json_response, may_hold_booleans, read_json
from app.registry import Registry
from app.schemas import DIGIT_ZERO, SEED_MAX, ProtocolError
from training import artifact, signatures


class _Segment(Convertor):
    """A path segment without ':', so ``/v1/models/digits:predict`` never reads as the model ``digits:predict``."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("segment", _Segment())
router = APIRouter(prefix="/v1/models", tags=["TensorFlow Serving REST API"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProtocolError, "description": "invalid argument (TF Serving's INVALID_ARGUMENT), named in 'error'"},
    404: {"model": ProtocolError, "description": "unknown model, version or label"},
}

_PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    413: {"model": ProtocolError, "description": "the body is larger than DROPOUT_SERVE_MAX_BODY_BYTES"},
}


class VersionStatus(BaseModel):
    version: str
    state: str = Field(description="LOADING, AVAILABLE, UNLOADING or END")
    status: dict[str, str] = Field(description="error_code (OK, or UNKNOWN for a failed load) and error_message")


class ModelStatus(BaseModel):
    model_version_status: list[VersionStatus]


class ModelMetadata(BaseModel):
    model_spec: dict[str, str] = Field(description="name, signature_name, version")
    metadata: dict[str, Any] = Field(description="signature_def: the SavedModel's SignatureDefs")


class Prediction(BaseModel):
    predictions: list[Any] | None = Field(None, description="row format: one entry per instance")
    outputs: Any = Field(None, description="columnar format (and mc_dropout): the output tensor")


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "signature_name": {"type": "string", "enum": ["serving_default", "mc_dropout"]},
                        "instances": {"type": "array", "minItems": 1, "items": {}},
                        "inputs": {},
                    },
                    "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
                },
                "example": {"instances": [DIGIT_ZERO]},
            }
        },
    }
}


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _status(registry: Registry, name: str, version: int | None = None, label: str | None = None) -> Response:
    statuses = registry.status(name)
    if label is not None:
        _, version = registry.resolve(name, label=label)
    if version is not None:
        statuses = [s for s in statuses if s.version == version]
        if not statuses:
            raise ApiError(404, f"model {name!r} has no version {version}")
    return json_response(
        {
            "model_version_status": [
                {
                    "version": str(s.version),
                    "state": s.state,
                    "status": {"error_code": "UNKNOWN" if s.error else "OK", "error_message": s.error or ""},
                }
                for s in statuses
            ]
        }
    )


@router.get("/{name:segment}", response_model=ModelStatus, responses=_ERRORS)
async def model_status(name: str, request: Request) -> Response:
    """The state of every version TF Serving would list: LOADING, AVAILABLE, UNLOADING or END."""
    return _status(_registry(request), name)


@router.get("/{name:segment}/versions/{version:segment}", response_model=ModelStatus, responses=_ERRORS)
async def version_status(name: str, version: int, request: Request) -> Response:
    return _status(_registry(request), name, version)


@router.get("/{name:segment}/labels/{label:segment}", response_model=ModelStatus, responses=_ERRORS)
async def label_status(name: str, label: str, request: Request) -> Response:
    return _status(_registry(request), name, label=label)


@cache
def _signature_defs(path: Path) -> dict[str, Any]:
    """The SavedModel's SignatureDefs as TF Serving's JSON printer writes them."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((path / "saved_model.pb").read_bytes())
    defs = saved.meta_graphs[0].signature_def
    return {
        key: json_format.MessageToDict(
            defs[key], always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        )
        for key in defs
        if not key.startswith("__")
    }


def _metadata(model: ServedModel) -> Response:
    return json_response(
        {
            "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
            "metadata": {"signature_def": {"signature_def": _signature_defs(model.path)}},
        }
    )


@router.get("/{name:segment}/metadata", response_model=ModelMetadata, responses=_ERRORS)
async def model_metadata(name: str, request: Request) -> Response:
    return _metadata(_registry(request).get(name))


@router.get("/{name:segment}/versions/{version:segment}/metadata", response_model=ModelMetadata, responses=_ERRORS)
async def version_metadata(name: str, version: int, request: Request) -> Response:
    return _metadata(_registry(request).get(name, version))


@router.get("/{name:segment}/labels/{label:segment}/metadata", response_model=ModelMetadata, responses=_ERRORS)
async def label_metadata(name: str, label: str, request: Request) -> Response:
    registry = _registry(request)
    return _metadata(registry.get(*registry.resolve(name, label=label)))


async def _predict(request: Request, name: str, version: int | None = None, label: str | None = None) -> Response:
    data, raw = await read_json(request, check_content_type=False)
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object with 'instances' or 'inputs'")
    unknown = set(data) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise ApiError(400, f"unknown field(s) {sorted(unknown)}; expected signature_name and instances or inputs")
    if ("instances" in data) == ("inputs" in data):
        raise ApiError(400, "send exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    signature = data.get("signature_name", artifact.SERVING_SIGNATURE)
    if not isinstance(signature, str):
        raise ApiError(400, f"'signature_name' must be a string, got {signature!r}")
    with _registry(request).lease(name, version, label) as model:
        annotate(request, model=model.name, version=model.version)
        if signature == artifact.SERVING_SIGNATURE:
            return await _serving_default(request, model, data, may_hold_booleans(raw))
        if signature == artifact.MC_SIGNATURE and model.mc_dropout is not None:
            return await _mc_dropout(request, model, data, may_hold_booleans(raw))
        known = [artifact.SERVING_SIGNATURE] + ([artifact.MC_SIGNATURE] if model.mc_dropout else [])
        raise ApiError(400, f"serving signature name {signature!r} not found; this model has {known}")


def _rows(model: ServedModel, data: dict[str, Any]) -> list[Any]:
    """The instances of a row-format request: plain values, or objects keyed by the input name."""
    instances = data["instances"]
    if not isinstance(instances, list) or not instances:
        raise ApiError(400, "'instances' must be a non-empty list")
    if all(isinstance(row, dict) for row in instances):
        if any(set(row) != {model.input_key} for row in instances):
            raise ApiError(400, f"each instance must hold exactly the signature's input {model.input_key!r}")
        return [row[model.input_key] for row in instances]
    return instances


async def _serving_default(request: Request, model: ServedModel, data: dict[str, Any], booleans: bool) -> Response:
    if "instances" in data:
        rows = _rows(model, data)
    else:
        columns = data["inputs"]
        if isinstance(columns, dict):
            if set(columns) != {model.input_key}:
                raise ApiError(400, f"'inputs' must hold exactly the input {model.input_key!r}, got {sorted(columns)}")
            columns = columns[model.input_key]
        if not isinstance(columns, list) or not columns:
            raise ApiError(400, "'inputs' must be a non-empty list of instances")
        rows = columns
    annotate(request, instances=len(rows))
    inference.check_instances(len(rows), request.app.state.settings)
    outputs = await inference.predict(model, inference.to_array(rows, model.input_shape, booleans))
    key = "predictions" if "instances" in data else "outputs"
    return json_response({key: outputs.tolist()})


async def _mc_dropout(request: Request, model: ServedModel, data: dict[str, Any], booleans: bool) -> Response:
    check_mc_enabled(request.app.state.settings)
    names = (artifact.INPUTS_KEY, artifact.SAMPLES_KEY, artifact.SEED_KEY)
    columns = data.get("inputs")
    if not isinstance(columns, dict) or set(columns) != set(names):
        raise ApiError(
            400,
            f"signature 'mc_dropout' takes the inputs {list(names)} in columnar format: "
            '{"signature_name": "mc_dropout", "inputs": {"inputs": [...], "samples": 100, "seed": 42}}',
        )
    rows, samples, seed = (columns[n] for n in names)
    if type(samples) is not int or samples < 1:
        raise ApiError(400, f"'samples' must be a positive integer, got {samples!r}")
    if type(seed) is not int or not 0 <= seed <= SEED_MAX:
        raise ApiError(400, f"'seed' must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    if not isinstance(rows, list) or not rows:
        raise ApiError(400, "'inputs' must be a non-empty list of instances")
    settings = request.app.state.settings
    inference.check_instances(len(rows), settings)
    inference.check_mc(model, len(rows), samples, settings)
    annotate(request, instances=len(rows), samples=samples)
    check_return_samples(settings, samples, len(rows), model.output_shape)  # every sample is returned
    batch = inference.to_array(rows, model.input_shape, booleans)
    return await inference.sample(model, batch, samples, seed, partial(_signature_outputs, model))


def _signature_outputs(model: ServedModel, draws: signatures.Samples) -> Response:
    """TF Serving's columnar answer: one output tensor as a list, several as an object by name.

    The answer is the raw samples, but the uncertainty histograms still count them, like every door's.
    """
    inference.summarize(model, draws)
    named = {
        artifact.OUTPUTS_KEY: draws.outputs,
        artifact.VARIANCE_KEY: draws.variance,
        artifact.PREDICTIVE_KEY: draws.predictive,
    }
    present = {key: value.tolist() for key, value in named.items() if value is not None}
    return json_response({"outputs": present if len(present) > 1 else present[artifact.OUTPUTS_KEY]})


_PREDICT_ROUTE: dict[str, Any] = {
    "response_model": Prediction,
    "responses": _PREDICT_ERRORS,
    "openapi_extra": _PREDICT_BODY,
}


@router.post("/{name:segment}:predict", **_PREDICT_ROUTE)
async def predict(name: str, request: Request) -> Response:
    """Row (``instances``) or columnar (``inputs``) prediction on the latest version."""
    return await _predict(request, name)


@router.post("/{name:segment}/versions/{version:segment}:predict", **_PREDICT_ROUTE)
async def predict_version(name: str, version: int, request: Request) -> Response:
    return await _predict(request, name, version)


@router.post("/{name:segment}/labels/{label:segment}:predict", **_PREDICT_ROUTE)
async def predict_label(name: str, label: str, request: Request) -> Response:
    return await _predict(request, name, label=label)
