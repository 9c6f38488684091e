"""The floor of a unary gRPC call on three servers, side by side: grpcio's asyncio server, asyncio + ``h2``, ours.

    python bench/http2_floor.py                       # 2 rounds, 3 s per cell, 1 x 32 and 32 x 1
    python bench/http2_floor.py --rounds 3 --duration 5s
    python bench/http2_floor.py --check               # start each server and check one call, no load

Why: the gRPC port left grpcio's asyncio server for our own HTTP/2 connection (``app/grpc/http2.py``)
because grpcio cost more Python per call than a whole REST request. The well-kept alternative to
hand-written HTTP/2 is python-hyper's ``h2`` (the state machine under hypercorn and httpx); this
measures it beside the other two, so the choice rests on numbers anyone can reproduce.

Every server answers ``inference.GRPCInferenceService/ServerLive`` with the same serialized
``ServerLiveResponse(live=True)`` from an ``async`` handler that does nothing, each in its own
process on a loopback port, one at a time:

  grpcio  ``grpc.aio.server`` with a generic handler (bytes in, bytes out)
  h2      a minimal unary gRPC server: an ``asyncio.Protocol`` around ``h2.connection.H2Connection``
          (default configuration), one task per call, the frames of one loop turn in one write
  h2-lean the same with h2's header validation and normalization switched off (its cheapest setting)
  ours    ``app.grpc.http2.Connection`` and ``app.grpc.calls.serve`` as ``app.grpc.server.Server``
          runs them, without its ``Gateway`` (keys, limits, access log, metrics): the transport alone

Each server is first checked with a real grpcio client call (grpc-status OK, ``live`` true), then
driven by h2load (``bench/h2load.py``) with one connection x 32 streams (one gRPC channel) and 32
connections x 1 stream (wrk's shape), after a warm-up, in ``--rounds`` rounds whose server order
alternates. Server CPU per call comes from ``/proc`` (``bench/cpu.py``). Prints a markdown table of
the medians with ratios against ours; exits 1 if any call failed, 2 if h2load is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cpu, h2load  # noqa: E402

SERVICE = "inference.GRPCInferenceService"
METHOD = f"/{SERVICE}/ServerLive"
ANSWER = pb.ServerLiveResponse(live=True).SerializeToString()
LIMIT = 4 * 1024 * 1024
"""The largest request message the servers keep (grpcio's default receive limit)."""
SERVERS = ("grpcio", "h2", "h2-lean", "ours")
SHAPES = ((1, 32), (32, 1))
"""(connections, streams per connection) of h2load."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((h2load.LOOPBACK, 0))
        return s.getsockname()[1]


async def live(request: bytes, context: object) -> bytes:
    return ANSWER


# -- the servers, each run in a process of its own (``--serve``) -------------------------------------------------


async def serve_grpcio(port: int) -> None:
    server = grpc.aio.server()
    handlers = {"ServerLive": grpc.unary_unary_rpc_method_handler(live)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"{h2load.LOOPBACK}:{port}")
    await server.start()
    await server.wait_for_termination()


async def serve_ours(port: int) -> None:
    from app.grpc import calls, http2

    handler = grpc.unary_unary_rpc_method_handler(live)
    loop, tasks = asyncio.get_running_loop(), set()

    def on_call(connection: http2.Connection, stream: http2.Stream) -> None:
        served = handler if calls.stream_path(stream) == METHOD else None
        stream.task = task = loop.create_task(calls.serve(connection, stream, served, None, LIMIT))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await loop.create_server(lambda: http2.Connection(on_call, LIMIT + 5), h2load.LOOPBACK, port)
    await server.serve_forever()


async def serve_h2(port: int, lean: bool = False) -> None:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    answer_headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    ok, unimplemented = [(b"grpc-status", b"0")], [(b"grpc-status", b"12")]
    loop, tasks = asyncio.get_running_loop(), set()
    checks = ("validate_inbound_headers", "normalize_inbound_headers", "validate_outbound_headers")
    checks += ("normalize_outbound_headers",)
    config = h2.config.H2Configuration(client_side=False, header_encoding=None, **dict.fromkeys(checks, not lean))

    class Connection(asyncio.Protocol):
        """One HTTP/2 connection: ``h2`` keeps its state, we move bytes and run one task per call."""

        def connection_made(self, transport: asyncio.Transport) -> None:
            self.transport: asyncio.Transport | None = transport
            self.h2 = h2.connection.H2Connection(config)
            self.requests: dict[int, tuple[bytes, bytearray]] = {}
            self.flushing = False
            self.h2.initiate_connection()
            self.flush()

        def data_received(self, data: bytes) -> None:
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.flush()
                self.transport.close()
                return
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    self.requests[event.stream_id] = (dict(event.headers)[b":path"], bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    self.requests[event.stream_id][1].extend(event.data)
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    task = loop.create_task(self.answer(event.stream_id, *self.requests.pop(event.stream_id)))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif isinstance(event, h2.events.StreamReset):
                    self.requests.pop(event.stream_id, None)
            self.schedule()

        async def answer(self, stream_id: int, path: bytes, body: bytearray) -> None:
            try:
                if path != METHOD.encode() or len(body) < 5:
                    self.h2.send_headers(stream_id, answer_headers + unimplemented, end_stream=True)
                else:
                    message = await live(bytes(body[5:]), None)
                    self.h2.send_headers(stream_id, answer_headers)
                    self.h2.send_data(stream_id, h2load.framed(message))  # a few bytes: always within the window
                    self.h2.send_headers(stream_id, ok, end_stream=True)
            except h2.exceptions.ProtocolError:  # the client reset the stream or closed the connection meanwhile
                return
            self.schedule()

        def schedule(self) -> None:
            """Write at the end of this loop turn, with every other call's frames, as ours does."""
            if not self.flushing:
                self.flushing = True
                loop.call_soon(self.flush)

        def flush(self) -> None:
            self.flushing = False
            if (data := self.h2.data_to_send()) and self.transport is not None:
                self.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.transport = None

    server = await loop.create_server(Connection, h2load.LOOPBACK, port)
    await server.serve_forever()


SERVE = {"grpcio": serve_grpcio, "h2": serve_h2, "h2-lean": partial(serve_h2, lean=True), "ours": serve_ours}


# -- the driver -----------------------------------------------------------------------------------------------------


def start(name: str, port: int) -> subprocess.Popen:
    """The server's process, once a real grpcio client got grpc-status OK and ``live`` true from it."""
    command = [sys.executable, __file__, "--serve", name, "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        with grpc.insecure_channel(f"{h2load.LOOPBACK}:{port}") as channel:
            call = channel.unary_unary(
                METHOD,
                request_serializer=pb.ServerLiveRequest.SerializeToString,
                response_deserializer=pb.ServerLiveResponse.FromString,
            )
            response, outcome = call.with_call(pb.ServerLiveRequest(), timeout=60, wait_for_ready=True)
        if outcome.code() != grpc.StatusCode.OK or not response.live:
            raise RuntimeError(f"{name}: {outcome.code()} live={response.live}")
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def measure(name: str, rounds: int, position: int, duration: str, warmup: str) -> list[dict]:
    """One server started, checked, and loaded with every shape; one dict per shape."""
    port = free_port()
    process = start(name, port)
    runs = []
    try:
        for connections, streams in SHAPES:
            h2load.drive(port, METHOD, b"", connections, streams, warmup)
            before = cpu.snapshot(process.pid)
            output, table = h2load.drive(port, METHOD, b"", connections, streams, duration)
            result = h2load.parse(output, table, {}, connections * streams)
            spent = cpu.per_request(before, cpu.snapshot(process.pid), result.requests, process.pid)
            runs.append(dict(server=name, round=position, connections=connections, streams=streams, result=result))
            runs[-1]["cpu"] = spent
            print(
                f"  round {position}/{rounds} {name:7}{connections:3} conn x{streams:3} streams"
                f" {result.rps:8.0f} calls/s  p50 {result.p50_ms:6.2f} ms  failed {result.non_2xx}"
                f"  errors {result.socket_errors}  server CPU {spent['loop']:.0f} + {spent['other']:.0f} us/call",
                flush=True,
            )
    finally:
        stop(process)
    return runs


def table(runs: list[dict], servers: list[str]) -> str:
    lines = [
        "| server | shape | calls/s (median) | by round | server CPU µs/call (loop + other) | calls/s vs ours"
        " | CPU/call vs ours |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for connections, streams in SHAPES:
        cells = {}
        for name in servers:
            mine = [r for r in runs if r["server"] == name and r["connections"] == connections]
            rps = statistics.median(r["result"].rps for r in mine)
            loop = statistics.median(r["cpu"]["loop"] for r in mine)
            other = statistics.median(r["cpu"]["other"] for r in mine)
            cells[name] = rps, loop, other, ", ".join(f"{r['result'].rps:,.0f}" for r in mine)
        ours = cells.get("ours")
        for name, (rps, loop, other, by_round) in cells.items():
            versus = f"{rps / ours[0]:.2f}" if ours else "—"
            cpu_versus = f"{(loop + other) / (ours[1] + ours[2]):.2f}" if ours else "—"
            lines.append(
                f"| {name} | {connections} conn x {streams} | {rps:,.0f} | {by_round} | {loop + other:.0f}"
                f" ({loop:.0f} + {other:.0f}) | {versus} | {cpu_versus} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--rounds", type=int, default=2, help="every server this many times, order alternating")
    parser.add_argument("--duration", default="3s", help="h2load's duration per cell (3s, 500ms)")
    parser.add_argument("--warmup", default="1s", help="h2load's duration of the untimed run before each cell")
    parser.add_argument("--check", action="store_true", help="only start each server and check one call")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        asyncio.run(SERVE[args.serve](args.port))
        return 0
    if args.check:
        for name in args.servers:
            stop(start(name, free_port()))
            print(f"{name}: ServerLive answered OK, live", flush=True)
        return 0
    if not h2load.available():
        print(h2load.INSTALL_HINT, file=sys.stderr)
        return 2
    version = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}, {version}")
    runs = []
    for position in range(1, args.rounds + 1):
        order = args.servers if position % 2 else args.servers[::-1]
        for name in order:
            runs += measure(name, args.rounds, position, args.duration, args.warmup)
    print(table(runs, args.servers))
    failures = sum(r["result"].non_2xx + r["result"].socket_errors for r in runs)
    print(f"failed calls and socket errors, all runs: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
