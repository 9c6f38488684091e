"""Running ``wrk`` against one URL and reading its numbers back.

wrk (Debian package ``wrk``) is a C load generator: it keeps ``connections`` keep-alive
connections busy, each sending the next request as soon as the previous answer arrives, for a
fixed time. Its Lua ``done`` hook prints the numbers we need on one line, so nothing depends on
wrk's human-readable output. wrk counts answers with status >= 400 as ``errors.status``; the
servers measured here answer nothing but 200 and 4xx/5xx, so that is the non-2xx count.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

INSTALL_HINT = "wrk is not installed: `apt-get update && apt-get install -y wrk` (Debian/Ubuntu), `brew install wrk`"

SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{stream}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %f %f %f %d %d %d %d %d %d %d\\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.mean / 1000,
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout))
end
"""

STREAM = """
local bodies = {{ {bodies} }}
local next_body = 0
request = function()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_body])
end
"""
"""A stream of bodies, each connection sending them in turn (wrk's per-request Lua costs the client a little)."""


@dataclass
class WrkResult:
    """One wrk run: latencies in ms, ``rps`` over the whole run, error counts as wrk reports them."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int

    def as_dict(self) -> dict:
        return asdict(self)


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit(INSTALL_HINT)


def parse(output: str) -> WrkResult:
    """The numbers from the ``RESULT`` line that :data:`SCRIPT`'s ``done`` hook prints."""
    line = next((line for line in output.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no RESULT line:\n{output[-2000:]}")
    p50, p99, mean, requests, duration_us, status, *socket = line.split()[1:]
    return WrkResult(
        p50_ms=float(p50),
        p99_ms=float(p99),
        mean_ms=float(mean),
        rps=int(requests) / (int(duration_us) / 1e6),
        requests=int(requests),
        non_2xx=int(status),
        socket_errors=sum(map(int, socket)),
    )


def script(body: str | list[str]) -> str:
    """The Lua script that POSTs ``body``, or each of a list of bodies in turn."""
    if isinstance(body, str):
        return SCRIPT.format(body=body, stream="")
    stream = STREAM.format(bodies=", ".join(f"[==[{b}]==]" for b in body))
    return SCRIPT.format(body=body[0], stream=stream)


def run(url: str, body: str | list[str], connections: int, seconds: int) -> WrkResult:
    """POST ``body`` (JSON text; a list: a stream of bodies) to ``url``, ``connections`` at once, for ``seconds``."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "post.lua"
        path.write_text(script(body))
        threads = min(connections, 2)  # wrk needs connections >= threads; the machine has few cores
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(path)]
        completed = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 60)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return parse(completed.stdout)
