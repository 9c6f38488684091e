"""Driving the gRPC port with ``h2load`` (nghttp2's HTTP/2 load generator, in C): wrk's counterpart for gRPC.

h2load knows HTTP/2, not gRPC, but a unary gRPC call is an HTTP/2 POST to ``/package.Service/Method``
whose body is the serialized request behind gRPC's 5-byte prefix (a 0 "not compressed" byte, then
the length as a big-endian uint32), with ``content-type: application/grpc`` and ``te: trailers``.
So h2load sends ready-made calls at a few µs of CPU each, as wrk does for REST, instead of the
~200 µs a Python gRPC client spends (``bench.grpc_load``, the fallback where h2load is missing).

h2load sees only the HTTP status, 200 for every gRPC answer, failed or not: the gRPC status
travels in the trailers. The caller therefore checks one answer with a real client first, and
``run`` counts the server's own answers for the method (``dropout_serve_requests_total`` on
``/metrics``) before and after: every one that is not OK is an error, except the calls h2load
abandons when its time is up (status 499, at most one per stream in flight).

Shapes: ``connections`` HTTP/2 connections with ``streams`` concurrent calls on each
(``-c``/``-m``): one connection with N streams is how a gRPC client (one channel) sends N
concurrent calls; N connections with one stream each is wrk's shape for REST.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np

from bench.wrk import WrkResult

LOOPBACK = "127.0.0.1"
INSTALL_HINT = "h2load is not installed: `apt-get update && apt-get install -y nghttp2-client` (Debian/Ubuntu)"
ABANDONED = "499"
"""The status the server records for a call its client cancelled."""


def available() -> bool:
    return shutil.which("h2load") is not None


def framed(message: bytes) -> bytes:
    """A serialized message as the body of a unary gRPC call: uncompressed, length-prefixed."""
    return b"\0" + struct.pack(">I", len(message)) + message


def answers(metrics_url: str, method: str) -> dict[str, float]:
    """The server's count of answers to ``method`` by status (``/metrics``), summed over models."""
    pattern = re.compile(r"^dropout_serve_requests_total\{(.*)\} (\S+)$", re.MULTILINE)
    counts: dict[str, float] = {}
    for labels, value in pattern.findall(httpx.get(metrics_url, timeout=30).text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("method") == "GRPC" and fields.get("route") == method:
            counts[fields["status"]] = counts.get(fields["status"], 0.0) + float(value)
    return counts


def run(
    port: int, method: str, message: bytes, connections: int, streams: int, seconds: int, metrics_url: str
) -> WrkResult:
    """``connections`` x ``streams`` concurrent calls of ``method`` with ``message`` for ``seconds``."""
    before = answers(metrics_url, method)
    output, table = drive(port, method, message, connections, streams, f"{seconds}s")
    after = answers(metrics_url, method)
    return parse(output, table, {k: after[k] - before.get(k, 0.0) for k in after}, connections * streams)


def drive(port: int, method: str, message: bytes, connections: int, streams: int, duration: str):
    """h2load's summary and per-call log for ``duration`` (h2load's: "10s", "500ms") of ``method`` calls."""
    with tempfile.TemporaryDirectory() as scratch:
        body, log = Path(scratch) / "body.bin", Path(scratch) / "calls.tsv"
        body.write_bytes(framed(message))
        command = ["h2load", f"-c{connections}", f"-m{streams}", f"-D{duration}", "-t1", "-d", str(body)]
        command += ["-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log}"]
        done = subprocess.run(
            [*command, f"http://{LOOPBACK}:{port}{method}"], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr[-2000:]}{done.stdout[-2000:]}")
        return done.stdout, np.loadtxt(log, dtype=np.int64, ndmin=2).reshape(-1, 3)


def parse(output: str, calls: np.ndarray, statuses: dict[str, float], in_flight: int) -> WrkResult:
    """h2load's summary and per-call log (start µs, HTTP status, µs to the end of the answer) as wrk's
    numbers, with the server's count of answers by status over the same run."""
    value, unit = re.search(r"finished in ([\d.]+)(m?s)", output).groups()
    seconds = float(value) / (1000 if unit == "ms" else 1)  # h2load writes "301.43ms" below a second
    counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", output)
    succeeded, failed, errored, timeout = map(int, counts.groups())
    ok = calls[calls[:, 1] == 200, 2] / 1000 if calls.size else np.zeros(0)
    ms = ok if ok.size else np.zeros(1)
    abandoned = statuses.get(ABANDONED, 0.0)
    not_ok = sum(count for status, count in statuses.items() if status not in ("200", ABANDONED))
    not_ok += max(abandoned - in_flight, 0)  # more cancelled calls than h2load can have left behind
    return WrkResult(
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        rps=succeeded / seconds,
        requests=succeeded,
        non_2xx=int(not_ok) + failed,
        socket_errors=errored + timeout,
    )
