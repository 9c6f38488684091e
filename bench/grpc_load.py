"""A small gRPC load generator, wrk's counterpart for the gRPC port: loopback only, bounded in time and calls.

    python -m bench.grpc_load --port 8001 --method /inference.GRPCInferenceService/ModelInfer \\
        --payload request.bin --concurrency 32 --seconds 10

``concurrency`` calls are kept in flight over one channel (one HTTP/2 connection, as a gRPC client
holds; ``--channels N`` spreads them over N, one connection each), each sending the next call as
soon as its answer arrives, for ``seconds`` or until ``max_calls`` answers, after ``warmup``
seconds that are not counted. The request is sent as ready-made bytes and the answers are not
parsed, so the client spends as little CPU per call as it can (it shares the machine with the
server, as wrk does); ``bench.servers`` checks the answers with a real client before anything is
timed. ``bench/serving.py`` uses it only where h2load (``bench.h2load``), 8x cheaper, is missing.
Prints wrk's ``RESULT`` line (``bench.wrk.parse`` reads it): latencies in ms, answers,
microseconds, then non-OK answers in the status field.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc
import numpy as np

LOOPBACK = "127.0.0.1"


async def _drive(
    calls: list[grpc.aio.UnaryUnaryMultiCallable], payload: bytes, concurrency: int, seconds: float, limit: int
):
    latencies: list[float] = []
    failed = issued = 0
    deadline = time.perf_counter() + seconds

    async def caller(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
        nonlocal failed, issued
        while time.perf_counter() < deadline and issued < limit:
            issued += 1
            start = time.perf_counter()
            try:
                await call(payload, timeout=10)
            except grpc.aio.AioRpcError:
                failed += 1
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(caller(calls[i % len(calls)]) for i in range(concurrency)))
    return np.asarray(latencies), failed, time.perf_counter() - start


async def load(
    port: int,
    method: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    warmup: float,
    max_calls: int,
    channels: int = 1,
) -> str:
    """wrk's RESULT line for ``seconds`` of ``concurrency`` concurrent calls of ``method`` on the loopback port."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel
    opened = [grpc.aio.insecure_channel(f"{LOOPBACK}:{port}", options=options) for _ in range(channels)]
    calls = [channel.unary_unary(method) for channel in opened]  # no serializers: bytes out, bytes back
    try:
        if warmup:
            await _drive(calls, payload, concurrency, warmup, max_calls)
        latencies, failed, elapsed = await _drive(calls, payload, concurrency, seconds, max_calls)
    finally:
        for channel in opened:
            await channel.close()
    ms = latencies * 1000 if latencies.size else np.zeros(1)
    p50, p99, mean = np.percentile(ms, 50), np.percentile(ms, 99), ms.mean()
    return f"RESULT {p50:f} {p99:f} {mean:f} {latencies.size} {int(elapsed * 1e6)} {failed} 0 0 0 0"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help=f"the server's gRPC port on {LOOPBACK}")
    parser.add_argument("--method", required=True, help="full method name, /package.Service/Method")
    parser.add_argument("--payload", type=Path, required=True, help="the serialized request message")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1, help="channels (connections) the calls are spread over")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=0)
    parser.add_argument("--max-calls", type=int, default=10_000_000, help="stop after this many answers")
    args = parser.parse_args(argv)
    line = asyncio.run(
        load(
            args.port,
            args.method,
            args.payload.read_bytes(),
            args.concurrency,
            args.seconds,
            args.warmup,
            args.max_calls,
            args.channels,
        )
    )
    print(line, flush=True)


if __name__ == "__main__":
    main()
