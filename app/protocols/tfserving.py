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

from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from google.protobuf import json_format
from starlette.convertors import Convertor, register_url_convertor

from app.context import record_of
from app.dataplane import DataPlane, InferRequest, InferResult, monte_carlo
from app.errors import ApiError, describe
from app.loading import ServedModel, signature_defs
from app.protocols import tfserving_schemas as docs
from app.protocols.body import dataplane, json_response, may_hold_booleans, read_json
from training import artifact


class _Segment(Convertor):
    """A path segment without ':', so ``/v1/models/digits:predict`` never reads as the model ``digits:predict``."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("segment", _Segment())
router = APIRouter(prefix="/v1/models", tags=["TensorFlow Serving REST API"])


def _status(plane: DataPlane, name: str, version: int | None = None, label: str | None = None) -> Response:
    statuses = plane.status(name, version, label)
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


@router.get("/{name:segment}", response_model=docs.ModelStatus, responses=docs.ERRORS)
async def model_status(name: str, request: Request) -> Response:
    """The state of every version TF Serving would list: LOADING, AVAILABLE, UNLOADING or END."""
    return _status(dataplane(request), name)


@router.get("/{name:segment}/versions/{version:segment}", response_model=docs.ModelStatus, responses=docs.ERRORS)
async def version_status(name: str, version: int, request: Request) -> Response:
    return _status(dataplane(request), name, version)


@router.get("/{name:segment}/labels/{label:segment}", response_model=docs.ModelStatus, responses=docs.ERRORS)
async def label_status(name: str, label: str, request: Request) -> Response:
    return _status(dataplane(request), name, label=label)


@cache
def _signature_defs_json(path: Path) -> dict[str, Any]:
    """The SignatureDefs as TF Serving's JSON printer writes them."""
    return {
        key: json_format.MessageToDict(
            definition, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        )
        for key, definition in signature_defs(path).items()
    }


def _metadata(model: ServedModel) -> Response:
    return json_response(
        {
            "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
            "metadata": {"signature_def": {"signature_def": _signature_defs_json(model.path)}},
        }
    )


@router.get("/{name:segment}/metadata", response_model=docs.ModelMetadata, responses=docs.ERRORS)
async def model_metadata(name: str, request: Request) -> Response:
    return _metadata(dataplane(request).model(name))


@router.get(
    "/{name:segment}/versions/{version:segment}/metadata", response_model=docs.ModelMetadata, responses=docs.ERRORS
)
async def version_metadata(name: str, version: int, request: Request) -> Response:
    return _metadata(dataplane(request).model(name, version))


@router.get("/{name:segment}/labels/{label:segment}/metadata", response_model=docs.ModelMetadata, responses=docs.ERRORS)
async def label_metadata(name: str, label: str, request: Request) -> Response:
    return _metadata(dataplane(request).model(name, label=label))


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
        raise ApiError(400, f"'signature_name' must be a string, got {describe(signature)}")
    call = InferRequest([], name, version, label, booleans=may_hold_booleans(raw), record=record_of(request.scope))
    if signature == artifact.SERVING_SIGNATURE:
        call.rows, call.input_name = _serving_rows(data)
        result = await dataplane(request).infer(call)
        return json_response({"predictions" if "instances" in data else "outputs": result.outputs.tolist()})
    if signature == artifact.MC_SIGNATURE:
        call.rows, call.mc = _mc_inputs(data)
        call.encode = _signature_outputs
        return (await dataplane(request).infer(call)).encoded
    known = [artifact.SERVING_SIGNATURE, artifact.MC_SIGNATURE]
    raise ApiError(400, f"serving signature name {signature!r} not found; signatures served here: {known}")


def _serving_rows(data: dict[str, Any]) -> tuple[list[Any], str | None]:
    """The instances of either format, and the input name they are keyed by (None: plain values)."""
    if "instances" in data:
        instances = data["instances"]
        if not isinstance(instances, list) or not instances:
            raise ApiError(400, "'instances' must be a non-empty list")
        if not all(isinstance(row, dict) for row in instances):
            return instances, None
        keys = {tuple(row) for row in instances}
        if len(keys) != 1 or len(next(iter(keys))) != 1:
            raise ApiError(400, "each instance must hold exactly the signature's one input, by the same name")
        key = next(iter(keys))[0]
        return [row[key] for row in instances], key
    columns = data["inputs"]
    key = None
    if isinstance(columns, dict):
        if len(columns) != 1:
            raise ApiError(400, f"'inputs' must hold exactly the signature's one input, got {sorted(columns)}")
        key, columns = next(iter(columns.items()))
    if not isinstance(columns, list) or not columns:
        raise ApiError(400, "'inputs' must be a non-empty list of instances")
    return columns, key


def _mc_inputs(data: dict[str, Any]) -> tuple[list[Any], Any]:
    names = (artifact.INPUTS_KEY, artifact.SAMPLES_KEY, artifact.SEED_KEY)
    columns = data.get("inputs")
    if not isinstance(columns, dict) or set(columns) != set(names):
        raise ApiError(
            400,
            f"signature 'mc_dropout' takes the inputs {list(names)} in columnar format: "
            '{"signature_name": "mc_dropout", "inputs": {"inputs": [...], "samples": 100, "seed": 42}}',
        )
    rows, samples, seed = (columns[n] for n in names)
    if samples is None or seed is None:
        raise ApiError(400, "signature 'mc_dropout' needs 'samples' and 'seed' (integers)")
    mc = monte_carlo(samples, seed, return_samples=True, names=("'samples'", "'seed'"))  # every sample is returned
    if not isinstance(rows, list) or not rows:
        raise ApiError(400, "'inputs' must be a non-empty list of instances")
    return rows, mc


def _signature_outputs(result: InferResult) -> Response:
    """TF Serving's columnar answer: one output tensor as a list, several as an object by name."""
    draws = result.draws
    named = {
        artifact.OUTPUTS_KEY: draws.outputs,
        artifact.VARIANCE_KEY: draws.variance,
        artifact.PREDICTIVE_KEY: draws.predictive,
    }
    present = {key: value.tolist() for key, value in named.items() if value is not None}
    return json_response({"outputs": present if len(present) > 1 else present[artifact.OUTPUTS_KEY]})


_PREDICT_ROUTE: dict[str, Any] = {
    "response_model": docs.Prediction,
    "responses": docs.PREDICT_ERRORS,
    "openapi_extra": docs.PREDICT_BODY,
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
