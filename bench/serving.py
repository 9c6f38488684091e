"""Serving latency and throughput, side by side with the floors they should be judged against.

    python bench/serving.py [--model-dir artifacts] [--duration 10] [--connections 1 8]

Part 1, in-process: one SavedModel signature call vs Keras ``predict`` on the same model, and
one ``mc_dropout`` call (T = 100) vs 100 inference passes in a Python loop.
Part 2, over HTTP with ``wrk`` (``apt-get install wrk``) against a real uvicorn process:
``GET /health/live`` (a bare FastAPI endpoint: the floor), ``POST /predict`` and
``POST /predict/mc-dropout`` (T = 100), one instance each, at each connection count.
Everything runs in one go, so the ratios compare numbers taken under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.schemas import DIGIT_ZERO  # noqa: E402

WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %f %f %f %d %d\\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1e6), summary.errors.status, summary.errors.timeout))
end
"""


def best_of(fn, repeat: int = 7, number: int = 50) -> float:
    """Milliseconds per call: the best of several timed batches (the least disturbed)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times) * 1000


def in_process(version_dir: Path) -> None:
    import keras
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    serving, mc = loaded.signatures["serving_default"], loaded.signatures["mc_dropout"]
    x = tf.constant([DIGIT_ZERO], tf.float32)
    keras_model = keras.Sequential(
        [keras.Input((64,)), keras.layers.TFSMLayer(str(version_dir), call_endpoint="serving_default")]
    )
    samples, seed = tf.constant(100), tf.constant(1, tf.int64)

    signature = best_of(lambda: serving(inputs=x))
    predict = best_of(lambda: keras_model.predict(x.numpy(), verbose=0), repeat=3, number=10)
    one_call = best_of(lambda: mc(inputs=x, samples=samples, seed=seed))
    loop = best_of(lambda: [serving(inputs=x) for _ in range(100)], repeat=3, number=3)
    print("\nin-process, one instance (ms per call, best of several batches)")
    print(f"  serving_default signature       {signature:8.3f}")
    print(f"  keras model.predict             {predict:8.3f}   {predict / signature:6.1f}x the signature")
    print(f"  mc_dropout, T=100, one call     {one_call:8.3f}")
    print(f"  100 inference passes in a loop  {loop:8.3f}   {loop / one_call:6.1f}x the one MC call")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "DROPOUT_SERVE_MODEL_DIR": str(model_dir), "DROPOUT_SERVE_HOST": "127.0.0.1"}
    env["DROPOUT_SERVE_PORT"] = str(port)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def wrk(url: str, method: str, body: dict | None, connections: int, duration: int, scratch: Path) -> dict:
    script = scratch / f"{method}-{connections}.lua"
    script.write_text(WRK_SCRIPT.format(method=method, body=json.dumps(body) if body else ""))
    threads = min(connections, 2)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = next(line for line in output.splitlines() if line.startswith("RESULT "))
    p50, p99, rate, bad_status, timeouts = result.removeprefix("RESULT ").split()
    if int(bad_status) or int(timeouts):
        raise SystemExit(f"{url}: {bad_status} non-2xx answers, {timeouts} timeouts")
    return {"p50": float(p50), "p99": float(p99), "rps": float(rate)}


def over_http(model_dir: Path, connections: list[int], duration: int) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    port = free_port()
    server = start_server(model_dir, port)
    base = f"http://127.0.0.1:{port}"
    endpoints = [
        ("GET /health/live (floor)", "GET", "/health/live", None),
        ("POST /predict", "POST", "/predict", {"instances": [DIGIT_ZERO]}),
        ("POST /predict/mc-dropout T=100", "POST", "/predict/mc-dropout", {"instances": [DIGIT_ZERO], "samples": 100}),
    ]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for count in connections:
                print(f"\nHTTP, one instance per request, {count} connection(s), {duration} s each (wrk)")
                print(f"  {'endpoint':34}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'p50 - floor':>13}")
                floor = None
                for label, method, path, body in endpoints:
                    r = wrk(base + path, method, body, count, duration, Path(scratch))
                    floor = floor or r
                    extra = f"{r['p50'] - floor['p50']:+10.2f} ms" if r is not floor else ""
                    print(f"  {label:34}{r['p50']:9.2f}{r['p99']:9.2f}{r['rps']:9.0f}{extra:>13}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    from training import artifact

    versions = artifact.versions(args.model_dir / "digits")
    if not versions:
        raise SystemExit(f"no digits model in {args.model_dir}: run `python -m training` first")
    print(f"model: {args.model_dir / 'digits' / str(versions[-1])}, {os.cpu_count()} CPUs")
    in_process(args.model_dir / "digits" / str(versions[-1]))
    over_http(args.model_dir, args.connections, args.duration)


if __name__ == "__main__":
    main()
