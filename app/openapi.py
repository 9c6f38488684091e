"""The OpenAPI document, exact about what the server answers: generated clients rely on it.

FastAPI documents what the routes declare. Three things it cannot know are added here, in one
place: the request bodies that routes read themselves (the lean path), the answers that come
from middleware rather than routes (keys, overload, deadline, body size), and the error shape
of each door (``{"detail"}`` natively, ``{"error"}`` under ``/v1`` and ``/v2``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.protocols import native
from app.routes import NATIVE, door_of, is_exempt, is_open, runs_mc
from app.schemas import ErrorResponse, ProtocolError
from app.settings import Settings


def _error(description: str, protocol: bool, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    model = ProtocolError if protocol else ErrorResponse
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def _operational(path: str, method: str, settings: Settings) -> dict[str, dict[str, Any]]:
    """The answers middleware may give on this operation, before or instead of the route."""
    protocol = door_of(path) is not NATIVE
    answers: dict[str, dict[str, Any]] = {}
    if method == "post":
        answers["413"] = _error("the body is larger than DROPOUT_SERVE_MAX_BODY_BYTES", protocol)
    if not is_open(path, settings.metrics_require_key):
        answers["401"] = _error(
            "an API key is required (DROPOUT_SERVE_API_KEYS) and was missing or wrong",
            protocol,
            {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
        )
    if not is_exempt(path):
        answers["503"] = _error(
            "overloaded: DROPOUT_SERVE_MAX_IN_FLIGHT requests are already running; retry after Retry-After",
            protocol,
            {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
        )
        answers["504"] = _error("the request ran past DROPOUT_SERVE_REQUEST_TIMEOUT", protocol)
    if method == "post" and runs_mc(path):
        answers["403"] = _error("MC dropout is switched off (DROPOUT_SERVE_MC_DROPOUT_ENABLED=false)", protocol)
    return answers


def build(app: FastAPI, settings: Settings) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (*native.REQUEST_MODELS, ErrorResponse, ProtocolError):
        components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name in ("HTTPValidationError", "ValidationError"):  # our 4xx bodies are one message, never a list
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if "HTTPValidationError" in str(responses.get("422")):  # FastAPI's default: ours is one message
                del responses["422"]
                door = door_of(path)
                responses.setdefault(
                    str(door.invalid_status),
                    _error("a parameter is not valid, named in the message", door is not NATIVE),
                )
            for code, answer in _operational(path, method, settings).items():
                responses.setdefault(code, answer)
    if settings.api_key_list():
        schema["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, operations in schema["paths"].items():
            if not is_open(path, settings.metrics_require_key):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the exact document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, settings)
        return app.openapi_schema

    app.openapi = openapi
