"""Load run: many requests over many connections, mixed /predict and MC dropout; errors and memory growth.

    python bench/load.py [--model-dir artifacts] [--requests 20000] [--connections 64] [--mc-share 0.25]

Starts ``python -m app`` on a free loopback port, sends a warm-up round, records the server's
resident memory (VmRSS), then sends ``--requests`` requests from ``--connections`` concurrent
keep-alive connections (httpx), a share of them ``/predict/mc-dropout`` with T = 100, the rest
``/predict``, one digit each. It samples the server's RSS every half second and reads
``/metrics`` before and after, so the server's own request count is checked against the client's.
Passes (exit 0) with zero errors and RSS growth under 10 % from the end of the warm-up to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.schemas import DIGIT_ZERO  # noqa: E402
from bench.serving import free_port  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def served_requests(base: str) -> float:
    """The server's own count of answered /predict and MC requests (dropout_serve_requests_total)."""
    total = 0.0
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("dropout_serve_requests_total{") and 'route="/predict' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def run(base: str, requests: int, connections: int, mc_share: float, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = ["mc" if rng.random() < mc_share else "predict" for _ in range(requests)]
    bodies = {"predict": {"instances": [DIGIT_ZERO]}, "mc": {"instances": [DIGIT_ZERO], "samples": 100}}
    paths = {"predict": "/predict", "mc": "/predict/mc-dropout"}
    latencies: dict[str, list[float]] = {"predict": [], "mc": []}
    errors: list[str] = []
    queue = iter(kinds)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async def worker(client: httpx.AsyncClient) -> None:
        for kind in queue:
            started = time.perf_counter()
            try:
                response = await client.post(paths[kind], json=bodies[kind])
                if response.status_code != 200:
                    errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(f"{kind}: {error!r}")
            latencies[kind].append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(connections)))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "latencies": latencies, "errors": errors}


async def sample_rss(pid: int, into: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        into.append(rss_bytes(pid))
        await asyncio.sleep(0.5)


async def measured(base: str, pid: int, args: argparse.Namespace) -> tuple[dict, list[int]]:
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, samples, stop))
    result = await run(base, args.requests, args.connections, args.mc_share, seed=1)
    stop.set()
    await sampler
    return result, samples


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--mc-share", type=float, default=0.25)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DROPOUT_SERVE_MODEL_DIR": str(args.model_dir.resolve())}
    env.update(DROPOUT_SERVE_HOST="127.0.0.1", DROPOUT_SERVE_PORT=str(port))
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        server = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{base}/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not become ready:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.3)
            warm = asyncio.run(run(base, args.warmup, args.connections, args.mc_share, seed=0))
            before_rss, before_count = rss_bytes(server.pid), served_requests(base)
            result, rss = asyncio.run(measured(base, server.pid, args))
            after_rss, after_count = rss_bytes(server.pid), served_requests(base)
        finally:
            server.terminate()
            code = server.wait(timeout=60)

    errors = warm["errors"] + result["errors"]
    growth = after_rss / before_rss - 1
    print(
        f"{args.requests} requests ({args.mc_share:.0%} MC, T = 100), {args.connections} connections, "
        f"{os.cpu_count()} CPUs, after {args.warmup} warm-up requests"
    )
    print(
        f"  wall time {result['seconds']:.1f} s, {args.requests / result['seconds']:.0f} req/s, errors: {len(errors)}"
    )
    for kind, values in result["latencies"].items():
        print(
            f"  {kind:8} n={len(values):6}  p50 {percentile(values, 50):7.1f} ms  p99 {percentile(values, 99):7.1f} ms"
        )
    print(
        f"  server RSS: {before_rss / 2**20:.1f} MiB after warm-up, {after_rss / 2**20:.1f} MiB at the end "
        f"({growth:+.1%}), peak {max(rss) / 2**20:.1f} MiB"
    )
    print(f"  server counted {after_count - before_count:.0f} requests in the run; exit code after SIGTERM: {code}")
    for error in errors[:10]:
        print("  error:", error)
    if errors or growth >= 0.10 or after_count - before_count != args.requests or code != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
