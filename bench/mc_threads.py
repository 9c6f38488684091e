"""How many MC-dropout calls should run at once, and with how many TensorFlow threads each.

    python bench/mc_threads.py [--model-dir artifacts] [--duration 8] [--samples 100 1000]

Starts one server per configuration of ``DROPOUT_SERVE_MC_THREADS`` x ``DROPOUT_SERVE_TF_THREADS``,
one after the other in this run, and sends MC requests (one digits instance, seeded) from 8
concurrent clients for ``--duration`` seconds each. Reports req/s, p50 and p99 per configuration,
and the ratio to the first one, so the numbers compare under the same machine load.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.schemas import DIGIT_ZERO  # noqa: E402

CONFIGURATIONS = [(1, None), (2, None), (4, None), (2, 1), (4, 1), (8, 1)]
"""(MC threads, TF threads); None = TensorFlow's default (all cores)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, mc_threads: int, tf_threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DROPOUT_SERVE_MODEL_DIR": str(model_dir), "DROPOUT_SERVE_MC_THREADS": str(mc_threads)}
    if tf_threads:
        env["DROPOUT_SERVE_TF_THREADS"] = str(tf_threads)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise TimeoutError("server did not become ready")


def load(url: str, samples: int, clients: int, duration: float) -> tuple[float, float, float, int]:
    latencies: list[float] = []
    failures = 0
    stop = time.monotonic() + duration
    lock = threading.Lock()

    def client(seed: int) -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = http.post(
                    "/predict/mc-dropout", json={"instances": [DIGIT_ZERO], "samples": samples, "seed": seed}
                )
                with lock:
                    latencies.append(time.perf_counter() - started)
                    failures += response.status_code != 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return len(latencies) / duration, quantiles[49] * 1000, quantiles[98] * 1000, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    print(f"| MC threads | TF threads | T | req/s | p50 ms | p99 ms | failed | vs first |\n|{'---|' * 8}")
    baseline: dict[int, float] = {}
    for mc_threads, tf_threads in CONFIGURATIONS:
        process, url = start(args.model_dir.resolve(), mc_threads, tf_threads)
        try:
            for samples in args.samples:
                load(url, samples, args.clients, 1.0)  # warm-up
                rate, p50, p99, failed = load(url, samples, args.clients, args.duration)
                ratio = rate / baseline.setdefault(samples, rate)
                row = [mc_threads, tf_threads or "default", samples, f"{rate:.0f}", f"{p50:.1f}", f"{p99:.1f}", failed]
                print("| " + " | ".join(map(str, row)) + f" | {ratio:.2f}x |")
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
