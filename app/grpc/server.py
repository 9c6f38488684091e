"""The gRPC port: our HTTP/2 server (``app.grpc.http2``) beside uvicorn, in the same process and event loop.

One port (``DROPOUT_SERVE_GRPC_PORT``, 8001 as Triton's; 0 switches it off) carries the Open
Inference Protocol v2 ``GRPCInferenceService``, TF Serving's ``PredictionService`` and
``ModelService``, and ``grpc.health.v1``, registered by the generated code's ``add_*_to_server``
as on a grpcio server. The app's lifespan starts it once the data plane exists and stops it on
shutdown: new calls are refused (GOAWAY) and calls in progress get ``GRACE_SECONDS`` to finish,
as uvicorn gives HTTP requests. Why not grpcio's own asyncio server: it costs the event loop
~200 µs of Python per call before any of our code, more than a whole REST request
(docs/benchmarks.md); grpcio stays the client side's and the generated code's package.

``Gateway`` is the gRPC counterpart of the HTTP middleware, around every call of the doors
(health is left alone, like ``/health/*``): the request id (the client's ``x-request-id``
metadata or a fresh one, returned in the trailing metadata), API keys (``authorization: Bearer``
or ``x-api-key`` metadata, else UNAUTHENTICATED), ``MAX_IN_FLIGHT`` (RESOURCE_EXHAUSTED beyond
it), ``REQUEST_TIMEOUT`` (DEADLINE_EXCEEDED), ``ApiError`` to its gRPC status
(``app.errors.GRPC_STATUS``), and one access-log line and the request metrics per call, with
method ``GRPC``, the full method name as route, and the HTTP status of the same answer (OK 200,
NOT_FOUND 404...), so one dashboard query covers every door.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from app import logs, metrics
from app.auth import key_matches, presented_key
from app.context import RequestRecord, request_id_from
from app.errors import GRPC_STATUS, ApiError
from app.grpc import calls
from app.grpc.calls import Context
from app.grpc.http2 import Connection, Stream
from app.settings import Settings

log = logging.getLogger("dropout_serve.grpc")

GRACE_SECONDS = 30.0
"""How long calls in progress may finish after shutdown begins (uvicorn's is the same, ``app.__main__``)."""
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Answered without a key and never refused or counted: probes, like ``/health/*``."""

_current: ContextVar[RequestRecord | None] = ContextVar("dropout_serve.grpc_call", default=None)

Behaviour = Callable[[Any, Context], Awaitable[Any]]
Registrar = Callable[["Server"], None]


def current_record() -> RequestRecord | None:
    """The record of the gRPC call being served, for the data plane to fill in (model, version, instances, T)."""
    return _current.get()


class Overloaded(ApiError):
    """``MAX_IN_FLIGHT`` reached: HTTP's 503, but RESOURCE_EXHAUSTED in gRPC (UNAVAILABLE means "not ready")."""


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.keys = [key.encode() for key in settings.api_key_list()]
        self.max_in_flight = settings.max_in_flight
        self.timeout = settings.request_timeout or None
        self.in_flight = 0

    async def __call__(self, method: str, behaviour: Behaviour, request: Any, context: Context) -> Any:
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        record = RequestRecord(request_id_from(metadata.get("x-request-id", "")), "GRPC", method, time.perf_counter())
        record.route = method
        trailer = (("x-request-id", record.request_id),)
        context.set_trailing_metadata(trailer)
        tokens = logs.request_id.set(record.request_id), _current.set(record)
        metrics.request_started()
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            self._check_key(metadata)
            if self.in_flight >= self.max_in_flight:
                limit = f"{self.max_in_flight} calls in progress (DROPOUT_SERVE_MAX_IN_FLIGHT)"
                raise Overloaded(503, f"the server is at its limit of {limit}; retry later")
            self.in_flight += 1
            try:
                async with asyncio.timeout(self.timeout):
                    response = behaviour(request, context)
                    if inspect.isawaitable(response):  # the generated bases' unserved methods are plain functions
                        response = await response
            finally:
                self.in_flight -= 1
            record.status = 200
            return response
        except ApiError as error:
            record.status = error.status
            code = "RESOURCE_EXHAUSTED" if isinstance(error, Overloaded) else GRPC_STATUS.get(error.status, "INTERNAL")
            failure = getattr(grpc.StatusCode, code), error.message
        except TimeoutError:
            record.status = 504
            failure = (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                (f"the call took longer than {self.timeout:g} s (DROPOUT_SERVE_REQUEST_TIMEOUT) and was abandoned"),
            )
        except NotImplementedError:  # what the generated bases raise for a method this server does not serve
            record.status = 501
            failure = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by dropout-serve"
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            record.status = 499
            raise
        except Exception:
            record.status = 500
            log.exception("%s failed", method)
            failure = grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
        finally:
            record.seconds = time.perf_counter() - record.start
            logs.access(record)
            metrics.request_finished(record)
            logs.request_id.reset(tokens[0])
            _current.reset(tokens[1])
        await context.abort(*failure, trailing_metadata=trailer)

    def _check_key(self, metadata: dict[str, str]) -> None:
        if not self.keys:
            return
        presented = presented_key({name.encode(): value.encode() for name, value in metadata.items()})
        if presented is None:
            raise ApiError(401, "an API key is required: send 'authorization: Bearer <key>' or 'x-api-key: <key>'")
        if not key_matches(presented, self.keys):
            raise ApiError(401, "the API key is not valid")


class Server:
    """Where the generated ``add_*_to_server`` register their handlers, and the listening socket."""

    def __init__(self, settings: Settings) -> None:
        self.gateway = Gateway(settings)
        self.limit = settings.max_body_bytes
        self._generic: list[grpc.GenericRpcHandler] = []
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._listener: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._calls: set[asyncio.Task] = set()

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._methods.update({f"/{service}/{name}": handler for name, handler in handlers.items()})

    def _handler(self, method: str) -> grpc.RpcMethodHandler | None:
        handler = self._methods.get(method)
        if handler is None:
            details = _CallDetails(method, ())
            handler = next((h for g in self._generic if (h := g.service(details)) is not None), None)
            if handler is not None:  # the methods the services know, once each
                self._methods[method] = handler
        return handler

    def _call(self, connection: Connection, stream: Stream) -> None:
        method = calls.stream_path(stream)
        handler = self._handler(method)
        gate = None if method.startswith(OPEN_SERVICES) or handler is None else partial(self.gateway, method)
        stream.task = task = asyncio.get_running_loop().create_task(
            calls.serve(connection, stream, handler, gate, self.limit)
        )
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def _connection(self) -> Connection:
        connection = Connection(self._call, self.limit + 5)
        self._connections.add(connection)
        connection.closed.add_done_callback(lambda _: self._connections.discard(connection))
        return connection

    async def listen(self, host: str, port: int, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(self._connection, host, port, reuse_port=reuse_port or None)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let calls in progress finish for up to ``grace`` seconds, then cancel the rest."""
        if self._listener is not None:
            self._listener.close()
        for connection in list(self._connections):
            connection.goaway()
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=grace)
        for task in list(self._calls):
            task.cancel()
        for connection in list(self._connections):
            connection.close()


@dataclass(frozen=True)
class _CallDetails(grpc.HandlerCallDetails):
    method: str
    invocation_metadata: tuple


async def start(settings: Settings, services: list[Registrar]) -> Server | None:
    """The gRPC server on ``HOST:GRPC_PORT`` with ``services`` registered, started; None when the port is 0.

    With several workers (``DROPOUT_SERVE_WORKERS``), every worker process binds the port with
    ``SO_REUSEPORT`` and the kernel spreads new connections over them, as uvicorn's shared socket
    spreads HTTP connections. One worker binds it alone, so a port already taken fails the start
    instead of silently sharing it with another server.
    """
    if not settings.grpc_port:
        return None
    server = Server(settings)
    for register in services:
        register(server)
    try:
        await server.listen(settings.host, settings.grpc_port, reuse_port=settings.workers > 1)
    except OSError as error:
        address = f"{settings.host}:{settings.grpc_port}"
        raise RuntimeError(f"gRPC cannot listen on {address} (DROPOUT_SERVE_GRPC_PORT): {error}") from None
    log.info("gRPC listening on %s:%s", settings.host, settings.grpc_port)
    return server


async def stop(server: Server | None) -> None:
    """Refuse new calls, let calls in progress finish for up to ``GRACE_SECONDS``, then cancel the rest."""
    if server is not None:
        await server.stop(GRACE_SECONDS)
