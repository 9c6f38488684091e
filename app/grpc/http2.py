"""HTTP/2 as gRPC uses it, server side: one ``asyncio.Protocol`` per connection, in the app's event loop.

grpcio's asyncio server costs the event loop ~200 µs of Python per call before any of our code
(its per-call objects and the hand-off from its completion-queue thread), more than a whole REST
request; this connection costs ~30 µs (docs/benchmarks.md). It carries what gRPC over HTTP/2
needs (the gRPC spec's PROTOCOL-HTTP2): the preface and SETTINGS, HEADERS and CONTINUATION
decoded with ``hpack`` (the dynamic table is the connection's), DATA with flow control both ways,
PING, RST_STREAM (the call is cancelled), WINDOW_UPDATE and GOAWAY (``drain``: calls in progress
finish, new streams are refused). No TLS, no server push, no priorities (they are advice).

Each request stream whose body is complete goes to ``on_call`` as a ``Stream``; the call answers
with ``respond`` (headers, messages, trailers). Header blocks are written as literals without
indexing, so nothing we send changes the peer's table.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0, 1, 6, 7, 9
MAX_STREAMS = 1000
"""Streams a connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS; ``MAX_IN_FLIGHT`` is below it)."""
MAX_HEADER_BLOCK = 65_536
"""Bytes of one header block, CONTINUATIONs included; a client sending more is cut off."""
WINDOW = 1 << 24
"""What we let a peer send ahead, per stream and per connection (grpcio's default is 64 KiB plus BDP probing)."""
UNFINISHED_BODIES = 16
"""Request bodies at the size limit that a connection may hold for calls whose request is not complete yet. A stream
whose DATA would go past it is refused (REFUSED_STREAM: nothing was processed, the client may retry): otherwise
``MAX_STREAMS`` half-sent requests could hold a thousand times the body limit on one connection."""
DECODED_BLOCKS = 64
"""Header blocks a connection remembers decoded (``Connection._decode``)."""
INITIAL_WINDOW, MAX_FRAME = 65_535, 16_384
"""HTTP/2's defaults for what the peer lets us send, until its SETTINGS say otherwise."""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _integer(value: int, prefix: int) -> bytes:
    """HPACK's integer with a ``prefix``-bit prefix (first byte's high bits left zero)."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((value,))
    out, value = bytearray((limit,)), value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def header_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Fields as HPACK literals without indexing, new names, no Huffman: stateless on both sides."""
    out = bytearray()
    for name, value in fields:
        out += b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value
    return bytes(out)


class Stream:
    __slots__ = ("_writable", "body", "buffered", "headers", "id", "open", "received", "task", "window")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], window: int) -> None:
        self.id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.buffered = 0  # body bytes counted in the connection's ``unfinished``, until the call starts
        self.window = window
        self.received = 0
        self.task: asyncio.Task | None = None
        self.open = True
        self._writable: asyncio.Event | None = None


class Connection(asyncio.Protocol):
    def __init__(self, on_call: Callable[[Connection, Stream], None], max_body: int) -> None:
        self.on_call = on_call
        self.max_body = max_body
        self.unfinished, self.max_unfinished = 0, UNFINISHED_BODIES * max_body
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started = False
        self.decoder = hpack.Decoder()
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.pending_headers: tuple[int, int, bytearray] | None = None
        self.window = INITIAL_WINDOW  # what we may send, connection-wide
        self.stream_window = INITIAL_WINDOW
        self.max_frame = MAX_FRAME
        self.unacked = 0
        self.going_away = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()

    # -- receiving ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HIHI", 0x3, MAX_STREAMS, 0x4, WINDOW)  # MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE
        transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WINDOW)))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.started:
            if len(buffer) < len(PREFACE):
                return
            if buffer[: len(PREFACE)] != PREFACE:
                return self._fail(PROTOCOL_ERROR)
            del buffer[: len(PREFACE)]
            self.started = True
        position, end = 0, len(buffer)
        while end - position >= 9:
            length = int.from_bytes(buffer[position : position + 3], "big")
            if length > MAX_FRAME:  # we never raise SETTINGS_MAX_FRAME_SIZE
                return self._fail(FRAME_SIZE_ERROR)
            if end - position - 9 < length:
                break
            kind, flags = buffer[position + 3], buffer[position + 4]
            stream_id = int.from_bytes(buffer[position + 5 : position + 9], "big") & 0x7FFFFFFF
            payload = bytes(buffer[position + 9 : position + 9 + length])
            position += 9 + length
            if not self._frame(kind, flags, stream_id, payload) or self.transport is None:
                return
        del buffer[:position]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> bool:
        if self.pending_headers is not None and kind != CONTINUATION:
            return self._fail(PROTOCOL_ERROR)
        if kind == DATA:
            return self._data(flags, stream_id, payload)
        if kind == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self.pending_headers = (stream_id, flags, bytearray(payload))
            return self._headers_done() if flags & END_HEADERS else True
        if kind == CONTINUATION:
            if self.pending_headers is None or self.pending_headers[0] != stream_id:
                return self._fail(PROTOCOL_ERROR)
            self.pending_headers[2].extend(payload)
            if len(self.pending_headers[2]) > MAX_HEADER_BLOCK:
                return self._fail(PROTOCOL_ERROR)
            return self._headers_done() if flags & END_HEADERS else True
        if kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self._write(frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._release(stream)
                stream.open = False
                if stream.task is not None:
                    stream.task.cancel()
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream_id == 0:
                self.window += increment
            elif (stream := self.streams.get(stream_id)) is not None:
                stream.window += increment
            self._wake()
        elif kind == GOAWAY:
            self.going_away = True
        return True

    def _headers_done(self) -> bool:
        stream_id, flags, block = self.pending_headers
        self.pending_headers = None
        try:
            headers = self._decode(bytes(block))
        except hpack.HPACKError:
            return self._fail(COMPRESSION_ERROR)
        if (stream := self.streams.get(stream_id)) is not None:  # the client's trailers end its request
            if flags & END_STREAM and stream.task is None:
                self._start(stream)
            return True
        if stream_id <= self.last_stream or stream_id % 2 == 0:
            return self._fail(PROTOCOL_ERROR)
        self.last_stream = stream_id
        if self.going_away or len(self.streams) >= MAX_STREAMS:
            self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
            return True
        stream = self.streams[stream_id] = Stream(stream_id, headers, self.stream_window)
        if flags & END_STREAM:
            self._start(stream)
        return True

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """``block`` decoded, from ``_decoded`` when it was seen since the dynamic table last changed: a client
        sending the same call again sends the same block (pure Python HPACK costs ~8 % of a call)."""
        headers = self._decoded.get(block)
        if headers is not None:
            return headers
        table = self.decoder.header_table.dynamic_entries
        first, size = table[0] if table else None, len(table)
        headers = self.decoder.decode(block, raw=True)
        if len(table) != size or (table[0] if table else None) is not first:  # indices moved: forget the blocks
            self._decoded.clear()
        elif len(self._decoded) < DECODED_BLOCKS:
            self._decoded[block] = headers
        return headers

    def _data(self, flags: int, stream_id: int, payload: bytes) -> bool:
        self.unacked += len(payload)
        if self.unacked > WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        stream = self.streams.get(stream_id)
        if stream is None or stream.task is not None:  # a stream we reset or answered already
            return True
        stream.received += len(payload)
        if stream.received > WINDOW // 2 and not flags & END_STREAM:
            self._write(frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", stream.received)))
            stream.received = 0
        if len(stream.body) <= self.max_body:  # beyond, the call refuses it without keeping the rest
            if self.unfinished + len(payload) > self.max_unfinished:
                del self.streams[stream_id]
                self._release(stream)
                self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", REFUSED_STREAM)))
                return True
            stream.body += payload
            stream.buffered += len(payload)
            self.unfinished += len(payload)
        if flags & END_STREAM:
            self._start(stream)
        return True

    def _start(self, stream: Stream) -> None:
        """The request is complete: its body is the call's now (calls in flight are bounded by ``MAX_IN_FLIGHT``)."""
        self._release(stream)
        self.on_call(self, stream)

    def _release(self, stream: Stream) -> None:
        self.unfinished -= stream.buffered
        stream.buffered = 0

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == 0x4:  # SETTINGS_INITIAL_WINDOW_SIZE: applies to the open streams too
                for stream in self.streams.values():
                    stream.window += value - self.stream_window
                self.stream_window = value
            elif key == 0x5:
                self.max_frame = value
        self._wake()

    def _fail(self, code: int) -> bool:
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, code)))
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for stream in self.streams.values():
            stream.open = False
            if stream.task is not None:
                stream.task.cancel()
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- sending -------------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _wake(self) -> None:
        for stream in self.streams.values():
            if stream._writable is not None:
                stream._writable.set()

    async def send(
        self, stream: Stream, headers: bytes | None, messages: Iterable[bytes], trailers: bytes | None = None
    ) -> None:
        """Send a header block (None: sent already), length-prefixed ``messages``, then the trailers if given,
        which end the stream."""
        out = [frame(HEADERS, END_HEADERS, stream.id, headers)] if headers is not None else []
        for message in messages:
            data = b"\0" + struct.pack(">I", len(message)) + message
            size = len(data)
            if size <= min(self.window, stream.window, self.max_frame):  # the usual case: one frame, no wait
                self.window -= size
                stream.window -= size
                out.append(frame(DATA, 0, stream.id, data))
            else:
                self._write(*out)
                out = []
                await self._send_data(stream, memoryview(data))
        if trailers is not None:
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, trailers))
            stream.open = False
            self.streams.pop(stream.id, None)
        self._write(*out)

    async def _send_data(self, stream: Stream, data: memoryview) -> None:
        while data:
            if self.transport is None or not stream.open:
                raise asyncio.CancelledError
            size = min(len(data), self.window, stream.window, self.max_frame)
            if size <= 0 or not self._writable.is_set():
                stream._writable = stream._writable or asyncio.Event()
                stream._writable.clear()
                await (stream._writable.wait() if size <= 0 else self._writable.wait())
                continue
            self.window -= size
            stream.window -= size
            self._write(frame(DATA, 0, stream.id, bytes(data[:size])))
            self._flush()  # large answers go out as they are cut, so the transport can push back
            data = data[size:]

    def _write(self, *frames: bytes) -> None:
        """Frames out at the end of this turn of the event loop, with every other call's: one send, not one each."""
        if self.transport is None:
            return
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.extend(frames)

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def goaway(self) -> None:
        """Refuse new streams (the peer opens a new connection for its next call); calls in progress go on."""
        if self.transport is not None and not self.going_away:
            self.going_away = True
            self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, NO_ERROR)))

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()
