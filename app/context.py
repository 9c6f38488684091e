"""What one request was about, gathered once and read by both the access log and the metrics.

``RequestContext`` is the outermost middleware: it gives each request an id (the client's
``X-Request-ID`` when it is a sane token, else a fresh one: a random prefix per process and a
counter, unique across replicas and cheaper than reading ``/dev/urandom`` per request), echoes
it in the response, times the request and, when it ends, hands one ``RequestRecord`` to ``logs.access`` and
``metrics.request_finished``. Routes say which model, version, instances and T they served with
``annotate``; anything they do not say stays empty (for example a 404 for an unknown model is
counted under model "", so client-chosen names never become metric labels).
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs, metrics
from app.errors import error_response

_SCOPE_KEY = "dropout_serve.record"
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    start: float
    route: str = "unmatched"
    """The route template (``/models/{name}``), never the raw path, so metric labels stay few."""
    status: int = 0
    model: str = ""
    version: int | None = None
    instances: int | None = None
    samples: int | None = None
    seconds: float = 0.0


def annotate(
    request: Request,
    *,
    model: str | None = None,
    version: int | None = None,
    instances: int | None = None,
    samples: int | None = None,
) -> None:
    """Record what this request served; arguments left None keep what an earlier call said."""
    record: RequestRecord | None = request.scope.get(_SCOPE_KEY)
    if record is None:  # the app runs without RequestContext (a unit test of a route)
        return
    if model is not None:
        record.model = model
    if version is not None:
        record.version = version
    if instances is not None:
        record.instances = instances
    if samples is not None:
        record.samples = samples


def record_of(scope: Scope) -> RequestRecord | None:
    """This request's record, for the data plane to fill in (None without ``RequestContext``)."""
    return scope.get(_SCOPE_KEY)


def header(scope: Scope, name: bytes) -> str:
    """The first value of header ``name`` (lower case), or "": straight from the scope, cheaper than
    building Starlette's ``Headers`` on every request."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def response_started(scope: Scope) -> bool:
    """Whether the response to this request has begun (``RequestContext`` records its status line)."""
    record: RequestRecord | None = scope.get(_SCOPE_KEY)
    return record is not None and record.status != 0


async def reply(scope: Scope, send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer an error from a middleware, before the app has seen the request, in its door's error shape."""
    response = error_response(scope["path"], status, message)
    response.headers.update(headers or {})
    await response(scope, _nothing_to_receive, send)


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = header(scope, b"x-request-id")
        if not (request_id and _SANE_ID.fullmatch(request_id)):
            request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
        record = RequestRecord(request_id, scope["method"], scope["path"], time.perf_counter())
        scope[_SCOPE_KEY] = record
        token = logs.request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        metrics.request_started()
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to log as an error
            record.status = 499  # nginx's "client closed request"
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            route = scope.get("route")
            record.route = getattr(route, "path", None) or "unmatched"
            record.seconds = time.perf_counter() - record.start
            logs.access(record)
            metrics.request_finished(record)
            logs.request_id.reset(token)
