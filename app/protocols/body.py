"""Reading JSON request bodies fast (orjson), with the errors a client can act on.

orjson is the fast path: it parses a body several times faster than the standard library and
writes NumPy-free Python values straight to bytes. It refuses the non-standard ``NaN`` and
``Infinity`` literals that some clients send, so a body it refuses is parsed once more by the
standard library, which accepts them, and the instance checker then names the bad value.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from app.context import header
from app.errors import BODY_KEY, ApiError

if TYPE_CHECKING:
    from app.dataplane import DataPlane

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_json(request: Request, check_content_type: bool = True) -> tuple[Any, bytes]:
    """The parsed body and its raw bytes; 415 for a non-JSON content type, 400 for broken JSON.

    TF Serving ignores the content type (its documented ``curl -d`` examples send a form type),
    so its door passes ``check_content_type=False``.
    """
    content_type = header(request.scope, b"content-type") if check_content_type else ""
    if content_type and "json" not in content_type:
        raise ApiError(415, f"send the body as JSON with 'Content-Type: application/json' (got {content_type!r})")
    raw = await body_bytes(request)
    return parse_json(raw), raw


async def body_bytes(request: Request) -> bytes:
    """The whole body, as ``BodySizeLimit`` left it in the scope (or read here when it did not run)."""
    raw = request.scope.get(BODY_KEY)
    return await request.body() if raw is None else raw


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"request body is not valid JSON: {error.msg} (at character {error.pos})") from None
    except ValueError as error:  # not UTF-8
        raise ApiError(400, f"request body is not valid JSON: {error}") from None


def dataplane(request: Request) -> DataPlane:
    """The app's data plane (``app.dataplane``); None before start-up has made it."""
    return request.app.state.dataplane


def validate(model: type[ModelT], data: Any) -> ModelT:
    """``data`` as ``model``, or a 422 listing every problem as ``field: message``."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()]
        raise ApiError(422, "; ".join(problems)) from None


def may_hold_booleans(raw: bytes) -> bool:
    """Whether the body could contain a JSON boolean (NumPy would read it as a number)."""
    return b"true" in raw or b"false" in raw


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, headers=headers, media_type="application/json")


def json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body the route reads itself, as if it were a parameter."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }
