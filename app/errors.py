"""Client errors with a message that names the problem, and the body-size guard."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.routes import door_of


class ApiError(Exception):
    """An error the client can fix; ``status`` is a 4xx code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


GRPC_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
"""The gRPC status code name of each ``ApiError`` status, as Triton and TF Serving map theirs.
MC switched off (403) is PERMISSION_DENIED: the server's policy refuses it, as the REST doors' 403
says. Overload is a 503 on REST; a gRPC door answers it RESOURCE_EXHAUSTED (gRPC's own convention)."""


def error_response(path: str, status: int, message: str) -> JSONResponse:
    """An error in the shape of the door ``path`` belongs to (``app.routes``)."""
    door = door_of(path)
    if status == 422:
        status = door.invalid_status
    return JSONResponse({door.error_key: message}, status_code=status)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(e["loc"] == ("body",) for e in errors):
        return error_response(
            request.url.path, 415, f"send the body as JSON with 'Content-Type: application/json' (got {content_type!r})"
        )
    broken = next((e for e in errors if e["type"] == "json_invalid"), None)
    if broken is not None:
        reason = broken.get("ctx", {}).get("error", "unparsable")
        position = broken["loc"][-1] if isinstance(broken["loc"][-1], int) else "?"
        return error_response(
            request.url.path, 400, f"request body is not valid JSON: {reason} (at character {position})"
        )
    return error_response(request.url.path, 422, "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in errors))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request.url.path, exc.status, exc.message)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods, in the error shape of the door that was knocked on."""
    response = error_response(request.url.path, exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


BODY_KEY = "dropout_serve.body"


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, reading no more than that.

    The body is collected here (the route would buffer it anyway) and replayed to the app; it is
    also left in the scope under ``BODY_KEY``, so a route that wants the whole body takes it from
    there instead of reading it once more through the replay.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(chunk := message.get("body", b""))
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        scope[BODY_KEY] = whole = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        await self.app(scope, _replay({"type": "http.request", "body": whole}, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.limit} bytes (DROPOUT_SERVE_MAX_BODY_BYTES)"
        await error_response(scope["path"], 413, message)(scope, receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
