"""One gRPC call on an HTTP/2 stream: the request message in, the handler run, the status out.

The handlers are the ones the generated code registers (``grpc.RpcMethodHandler``: unary-unary
and unary-stream, as every service here has), called as grpcio's asyncio server calls them, with
a ``Context`` carrying what they use of ``grpc.aio.ServicerContext``. The gRPC spec's rules hold:
one length-prefixed message per request (gzip-compressed or not), the client's ``grpc-timeout``
as a deadline (DEADLINE_EXCEEDED), ``MAX_BODY_BYTES`` as the message limit (RESOURCE_EXHAUSTED),
``grpc-status`` and a percent-encoded ``grpc-message`` in the trailers (a trailers-only answer
when no message went out), ``-bin`` metadata in base64, and an unknown method UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.parse
import zlib
from collections.abc import Sequence
from typing import Any

import grpc

from app.grpc.http2 import Connection, Stream, header_block

log = logging.getLogger("dropout_serve.grpc")

STATUS_200 = b"\x88"  # ":status: 200", HPACK static table entry 8
HEADERS = STATUS_200 + header_block([(b"content-type", b"application/grpc")])
NOT_GRPC = header_block([(b":status", b"415")])
RESERVED = {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
MESSAGE_LIMIT = 4096
"""Characters of ``grpc-message`` sent at most: a header block must fit in a frame."""

Metadata = Sequence[tuple[str, str | bytes]]


class Abort(Exception):
    """What ``Context.abort`` raises, as ``grpc.aio.AbortError``: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class Context:
    """The part of ``grpc.aio.ServicerContext`` the handlers here use."""

    __slots__ = ("_connection", "_serialize", "_stream", "_trailing", "code", "details", "headers_sent")

    def __init__(self, connection: Connection, stream: Stream, serialize: Any) -> None:
        self._connection, self._stream, self._serialize = connection, stream, serialize
        self._trailing: Metadata = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.headers_sent = False

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        pairs = []
        for name, value in self._stream.headers:
            if name[:1] == b":" or name in RESERVED:
                continue
            key = name.decode("ascii")
            pairs.append((key, base64.b64decode(value + b"==") if key.endswith("-bin") else value.decode("latin-1")))
        return tuple(pairs)

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def peer(self) -> str:
        host, port, *_ = self._connection.transport.get_extra_info("peername") or ("", 0)
        return f"ipv4:{host}:{port}"

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        raise Abort(code, details, trailing_metadata or self._trailing)

    async def write(self, message: Any) -> None:
        """One message of a server-streaming answer."""
        headers = None if self.headers_sent else HEADERS
        self.headers_sent = True
        await self._connection.send(self._stream, headers, [self._serialize(message)])


def trailers(code: grpc.StatusCode, details: str, metadata: Metadata, alone: bool) -> bytes:
    """The trailing header block; ``alone``: a trailers-only answer, so with the status and content type."""
    fields = [(b"grpc-status", str(code.value[0]).encode())]
    if details:
        quoted = urllib.parse.quote(details[:MESSAGE_LIMIT], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        fields.append((b"grpc-message", quoted.encode("ascii")))
    for key, value in metadata:
        if key.endswith("-bin"):
            value = base64.b64encode(value if isinstance(value, bytes) else value.encode()).rstrip(b"=")
        fields.append((key.encode("ascii"), value if isinstance(value, bytes) else value.encode("latin-1")))
    return (HEADERS if alone else b"") + header_block(fields)


def timeout(headers: list[tuple[bytes, bytes]]) -> float | None:
    """The client's deadline (``grpc-timeout``) in seconds from now; None without one."""
    for name, value in headers:
        if name == b"grpc-timeout" and value[-1:] in TIMEOUT_UNITS and value[:-1].isdigit():
            return int(value[:-1]) * TIMEOUT_UNITS[value[-1:]]
    return None


def request_message(stream: Stream, limit: int) -> bytes:
    """The one request message of a unary call, or an ``Abort`` saying what is wrong with the body."""
    body = stream.body
    too_large = f"the request message is larger than {limit} bytes (DROPOUT_SERVE_MAX_BODY_BYTES)"
    if len(body) > limit + 5:  # the connection keeps no more than that
        raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large, ())
    if len(body) < 5 or len(body) != 5 + int.from_bytes(body[1:5], "big"):
        raise Abort(grpc.StatusCode.INTERNAL, "expected exactly one length-prefixed request message", ())
    message = bytes(body[5:])
    if body[0]:
        encoding = dict(stream.headers).get(b"grpc-encoding", b"identity")
        if encoding != b"gzip":
            unsupported = f"grpc-encoding {encoding.decode('latin-1')!r} is not supported; send identity or gzip"
            raise Abort(grpc.StatusCode.UNIMPLEMENTED, unsupported, ())
        try:  # at most one byte past the limit: a small compressed message must not inflate without bound
            message = zlib.decompressobj(wbits=31).decompress(message, limit + 1)  # wbits 31: gzip
        except zlib.error:
            raise Abort(grpc.StatusCode.INTERNAL, "the request message is not valid gzip", ()) from None
        if len(message) > limit:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large, ())
    return message


async def serve(connection: Connection, stream: Stream, handler: grpc.RpcMethodHandler | None, gate: Any, limit: int):
    """Run one call to its end: the answer and trailers sent, or nothing if the client went away."""
    context = Context(connection, stream, handler.response_serializer if handler else None)
    status, details, messages = grpc.StatusCode.OK, "", []
    if not dict(stream.headers).get(b"content-type", b"").startswith(b"application/grpc"):
        return await connection.send(stream, None, [], NOT_GRPC)  # HTTP's answer, as the gRPC spec asks
    try:
        if handler is None or handler.request_streaming:
            raise Abort(grpc.StatusCode.UNIMPLEMENTED, f"{stream_path(stream)} is not served", ())
        request = request_message(stream, limit)
        if handler.request_deserializer is not None:
            try:
                request = handler.request_deserializer(request)
            except Exception:  # protobuf's DecodeError and kin: as grpcio answers a message it cannot parse
                raise Abort(grpc.StatusCode.INTERNAL, "the request message could not be parsed", ()) from None
        seconds = timeout(stream.headers)
        if seconds is None:
            messages = await _run(handler, request, context, gate)
        else:
            async with asyncio.timeout(seconds):
                messages = await _run(handler, request, context, gate)
        if context.code is not None and context.code != grpc.StatusCode.OK:
            status, details, messages = context.code, context.details, []
    except Abort as abort:
        status, details, messages = abort.code, abort.details, []
        context.set_trailing_metadata(abort.trailing or context.trailing_metadata())
    except TimeoutError:
        status, details, messages = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", []
    except Exception:
        log.exception("%s failed", stream_path(stream))
        status, details, messages = grpc.StatusCode.INTERNAL, "internal error; the server log has the details", []
    alone = not messages and not context.headers_sent
    headers = None if alone or context.headers_sent else HEADERS
    await connection.send(stream, headers, messages, trailers(status, details, context.trailing_metadata(), alone))


async def _run(handler: grpc.RpcMethodHandler, request: Any, context: Context, gate: Any) -> list[bytes]:
    """The handler's answer: a unary call's one message, or none after a streaming call wrote its own."""
    if handler.unary_unary is not None:
        behaviour = handler.unary_unary
        response = await (gate(behaviour, request, context) if gate else behaviour(request, context))
        serialize = handler.response_serializer
        return [serialize(response) if serialize else response]
    result = handler.unary_stream(request, context)
    if hasattr(result, "__aiter__"):
        async for message in result:
            await context.write(message)
    else:
        await result
    return []


def stream_path(stream: Stream) -> str:
    return dict(stream.headers).get(b":path", b"").decode("latin-1")
