"""Serving throughput and latency against a floor and two peers, side by side in one run.

    python bench/serving.py            # the full run: 10 s per measurement, 1/8/32/64 connections (~20 min)
    python bench/serving.py --quick    # 2 s per measurement, 1/8/32 connections (~3 min)
    python bench/serving.py --servers floor ours-batched --connections 1 32 --duration 5
    python bench/serving.py --rounds 3 # every server three times, interleaved; figures from the medians

Needs wrk (``apt-get update && apt-get install -y wrk``) and a trained model
(``python -m training --if-missing``). Each server runs alone while it is measured: start, check
its answers, warm up, measure every workload at every connection count with wrk, stop; then the
next. So the ratios below compare numbers taken in one invocation, under the same conditions.
On a shared machine one cell can be off by 20-30 %; ``--rounds N`` measures every server N times,
one round after another, and takes each cell's median, so one slow stretch cannot decide a figure.

Servers (one process each, loopback only, no access logs):
  floor           bare FastAPI app, one POST route returning a constant (bench/floor_app.py)
  minimal         minimal FastAPI route calling the SavedModel's serving_default (bench/minimal_app.py)
  mlserver        MLServer 1.7, adaptive batching (max_batch_size 32, max_batch_time 2 ms), the same
                  SavedModel through bench/mlserver_runtime.py, in its own virtual environment
                  bench/.venv-mlserver (created on first use, a few minutes; not a project dependency)
  ours-unbatched  uvicorn app.main:app with DROPOUT_SERVE_MAX_BATCH_SIZE=1
  ours-batched    uvicorn app.main:app with default settings (gRPC on a second port)
  ours-before     the same before this session's changes: --before, a commit (default 38c439a, before
                  issues 18 and 21) served from a `git worktree` of it, or a source tree; fixed-T workloads,
                  and auto if that code has it
Workloads: predict-1 and predict-32 (1 and 32 digit instances per request), mc-100
(/predict/mc-dropout, 1 instance, T = 100; at the --mc-connections counts), mc-100-mixed /
mc-auto-mixed: the mixed stream of bench/adaptive.py (test digits plus 10 % boxes, noise and inverted
digits), one instance per request in turn, T = 100 or samples "auto" (at --mixed-connections), mc-10-mixed:
T = 10, auto's first stretch alone, mc-1 / mc-1-mixed: T = 1, the cheapest MC request, which bounds what
any MC request and any auto schedule can reach, and mc-100-mixed-32 / mc-auto-mixed-32: the mixed stream
cut into requests of 32 instances;
for ours-batched also v2-1 (REST /v2/models/{m}/infer, JSON, 1 instance), grpc-v2-1 (gRPC
ModelInfer, raw FP32, 1 instance) and grpc-live (gRPC ServerLive: a call that does nothing), the gRPC
ones N concurrent calls on one HTTP/2 connection (one channel, as a gRPC client sends them) in the
"N conn" columns, and grpc-v2-1-conns, the same calls on N connections, one each (wrk's shape). The
gRPC load generator is h2load (bench/h2load.py; Debian package nghttp2-client) where installed, else
bench/grpc_load.py (Python, which costs the shared CPU ~8x more per call); the output names it.

Prints markdown tables and the ratios issues 9, 18 and 21 name, and writes all numbers to
bench/results/serving-<UTC time>.json. The full run also times the in-process costs
(bench/in_process.py) and samples "auto" against T = 2,000 (bench/adaptive.py). Exits 1 if a
server failed or any answer was not 2xx.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.schemas import DIGIT_ZERO  # noqa: E402
from bench import adaptive, cpu, h2load, in_process, servers, wrk  # noqa: E402
from bench.servers import Workload  # noqa: E402

SERVERS = ["floor", "minimal", "mlserver", "ours-unbatched", "ours-batched", "ours-before"]
BEFORE = "38c439a"
"""The last commit before issues 18 and 21 (MC batching, the data plane, gRPC): ``ours-before`` serves it."""
OURS = "ours-batched"  # the acceptance ratios are about the default configuration


def digit_rows(count: int) -> list[list[int]]:
    from sklearn.datasets import load_digits

    return load_digits().data[:count].astype(int).tolist()


def mixed_rows() -> list[list[float]]:
    """The test digits plus 10 % out-of-distribution inputs (bench/adaptive.py), one request each."""
    from bench.adaptive import mixed_stream

    return np.round(mixed_stream()[0], 2).tolist()


WORKLOADS = [
    Workload("predict-1", [DIGIT_ZERO]),
    Workload("predict-32", digit_rows(32)),
    Workload("mc-100", [DIGIT_ZERO], samples=100),
    Workload("mc-100-mixed", mixed_rows(), samples=100, stream=True),
    Workload("mc-auto-mixed", mixed_rows(), samples="auto", stream=True),
    Workload("mc-10-mixed", mixed_rows(), samples=10, stream=True),  # auto's first stretch alone
    Workload("mc-1", [DIGIT_ZERO], samples=1),  # the cheapest MC request: what any MC request can reach
    Workload("mc-1-mixed", mixed_rows(), samples=1, stream=True),  # one sample: what any auto schedule can reach
    Workload("mc-100-mixed-32", mixed_rows(), samples=100, stream=True, per_request=32),
    Workload("mc-auto-mixed-32", mixed_rows(), samples="auto", stream=True, per_request=32),
]


GRPC_CONNECTIONS = {"grpc-v2-1-conns"}
"""gRPC workloads whose N calls go over N connections, one each (wrk's shape); the others send them
on one connection, as one gRPC channel does."""
ONE_ROW = {"v2-1": "predict-1", "grpc-v2-1": "predict-1", "grpc-v2-1-conns": "predict-1", "grpc-live": "predict-1"}
"""The Open Inference Protocol workloads (``bench.servers.ours``) send predict-1's row."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(name: str, args: argparse.Namespace, version_dir: Path, scratch: Path) -> servers.Server:
    if name == "floor":
        return servers.floor(free_port(), WORKLOADS)
    if name == "minimal":
        return servers.minimal(free_port(), version_dir, WORKLOADS)
    if name == "mlserver":
        ports = (free_port(), free_port(), free_port())
        return servers.mlserver(ports, version_dir, args.model, WORKLOADS, scratch / args.model)
    if name == "ours-before":
        return servers.before(free_port(), args.model_dir, args.model, WORKLOADS, args.before, scratch)
    ports = (free_port(), free_port())
    return servers.ours(ports, args.model_dir, args.model, WORKLOADS, batched=name == "ours-batched")


def measure(server: servers.Server, args: argparse.Namespace, reference: dict) -> list[dict]:
    """Check the server's answers, then warm up and time each of its workloads; one dict per wrk run."""
    specs = {w.name: w for w in WORKLOADS}
    for workload in [*server.requests, *server.grpc_calls]:
        spec = specs[ONE_ROW.get(workload, workload)]
        rows = min(spec.per_request, len(spec.rows)) if spec.stream else len(spec.rows)
        probabilities = server.answer(workload)
        if probabilities is None:
            continue
        if probabilities.shape[0] != rows:
            raise RuntimeError(f"{server.name} {workload}: {probabilities.shape[0]} answers for {rows} rows")
        if not workload.startswith("mc"):  # the same model everywhere and through every door: answers agree
            expected = reference.setdefault(rows, probabilities)
            if (difference := float(np.max(np.abs(probabilities - expected)))) > 1e-4:
                raise RuntimeError(f"{server.name} {workload}: answers differ from the others' by {difference:.2g}")
    runs = []
    for workload in [*server.requests, *server.grpc_calls]:
        spec = specs[ONE_ROW.get(workload, workload)]
        counts = args.mixed_connections if spec.stream else args.mc_connections if spec.samples else args.connections
        load = (
            partial(_grpc_load, server, workload, args.grpc_generator)
            if workload in server.grpc_calls
            else partial(_wrk, server, workload)
        )
        load(max(counts), args.warmup)
        for connections in counts:
            pid = server.process.pid
            before = cpu.snapshot(pid) if cpu.available() else {}
            client_before = cpu.children()
            result = load(connections, args.duration)
            spent = cpu.per_request(before, cpu.snapshot(pid), result.requests, pid) if before else None
            client = (cpu.children() - client_before) * 1e6 / max(result.requests, 1)
            run = {"server": server.name, "workload": workload, "connections": connections, **result.as_dict()}
            run |= {"cpu_us_per_request": spent, "client_cpu_us_per_request": client}
            runs.append(run | {"generator": generator(workload, server, args.grpc_generator)})
            print(
                f"  {server.name:15}{workload:11}{connections:3} conn {result.rps:8.0f} req/s"
                f"  p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:7.2f} ms"
                f"  non-2xx {result.non_2xx}  socket errors {result.socket_errors}"
                + (f"  CPU/request {spent['loop']:.0f} us loop + {spent['other']:.0f} us other" if spent else "")
                + f", load generator ({generator(workload, server, args.grpc_generator)}) {client:.0f} us",
                flush=True,
            )
    return runs


def _wrk(server: servers.Server, workload: str, connections: int, seconds: int) -> wrk.WrkResult:
    path, body = server.requests[workload]
    return wrk.run(server.url + path, body, connections, seconds)


GRPC_GENERATORS = {"h2load": "h2load", "python": "bench/grpc_load.py"}


def grpc_generator(choice: str) -> str:
    """The gRPC load generator ``--grpc-generator`` names; "auto": h2load where installed, else bench/grpc_load.py."""
    if choice == "auto":
        choice = "h2load" if h2load.available() else "python"
    return GRPC_GENERATORS[choice]


def generator(workload: str, server: servers.Server, choice: str = "auto") -> str:
    """The load generator of a workload: wrk for REST, ``grpc_generator(choice)`` for gRPC."""
    return grpc_generator(choice) if workload in server.grpc_calls else "wrk"


def _grpc_load(server: servers.Server, workload: str, choice: str, calls: int, seconds: int) -> wrk.WrkResult:
    """``calls`` concurrent gRPC calls for ``seconds``, by h2load or bench/grpc_load.py (own process, as wrk)."""
    method, payload = server.grpc_calls[workload]
    connections = calls if workload in GRPC_CONNECTIONS else 1
    if generator(workload, server, choice) == "h2load":
        streams = calls // connections
        return h2load.run(server.grpc_port, method, payload, connections, streams, seconds, server.url + "/metrics")
    with tempfile.NamedTemporaryFile(suffix=".bin") as request:
        request.write(payload)
        request.flush()
        command = [sys.executable, "-m", "bench.grpc_load", "--port", str(server.grpc_port), "--method", method]
        command += ["--payload", request.name, "--concurrency", str(calls), "--seconds", str(seconds)]
        command += ["--channels", str(connections)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"bench/grpc_load.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return wrk.parse(done.stdout)


NO_SLOWER = 0.95
""""No slower than before": within 5 %, less than the spread of one cell between rounds on a shared machine."""

# Issues 9, 18 and 21's acceptance figures: (figure, cell a, cell b, "/" for a / b or "-" for a - b, target).
# A cell is (server, workload, connections, number); targets are ">= x" for ratios, "<= ms" for differences.
FIGURES = [
    (
        "/predict 1 instance, 32 conn: req/s vs floor",
        (OURS, "predict-1", 32, "rps"),
        ("floor", "predict-1", 32, "rps"),
        "/",
        0.8,
    ),
    (
        "/predict 1 instance, 32 conn: req/s vs minimal route",
        (OURS, "predict-1", 32, "rps"),
        ("minimal", "predict-1", 32, "rps"),
        "/",
        2,
    ),
    (
        "/predict 1 instance, 32 conn: req/s vs MLServer",
        (OURS, "predict-1", 32, "rps"),
        ("mlserver", "predict-1", 32, "rps"),
        "/",
        1.5,
    ),
    (
        "/predict 1 instance, 64 conn: batched vs unbatched req/s",
        (OURS, "predict-1", 64, "rps"),
        ("ours-unbatched", "predict-1", 64, "rps"),
        "/",
        3,
    ),
    (
        "/predict 1 instance, 1 conn: p50 minus floor p50",
        (OURS, "predict-1", 1, "p50_ms"),
        ("floor", "predict-1", 1, "p50_ms"),
        "-",
        1,
    ),
    (
        "MC T=100 1 instance, 1 conn: p50 minus floor p50",
        (OURS, "mc-100", 1, "p50_ms"),
        ("floor", "predict-1", 1, "p50_ms"),
        "-",
        1,  # issue 18 (issue 9 asked for 2)
    ),
    (
        "gRPC ModelInfer 1 instance, 32 calls: req/s vs REST v2 /infer at 32 conn",
        (OURS, "grpc-v2-1", 32, "rps"),
        (OURS, "v2-1", 32, "rps"),
        "/",
        1,
    ),
    (
        "gRPC ModelInfer 1 instance, 32 connections x 1 call: req/s vs REST v2 /infer at 32 conn",
        (OURS, "grpc-v2-1-conns", 32, "rps"),
        (OURS, "v2-1", 32, "rps"),
        "/",
        None,
    ),
    (
        "gRPC ModelInfer 1 instance, 1 call: p50 minus REST v2 /infer's",
        (OURS, "grpc-v2-1", 1, "p50_ms"),
        (OURS, "v2-1", 1, "p50_ms"),
        "-",
        None,
    ),
    (
        "gRPC ServerLive (a call that does nothing), 32 calls: req/s vs REST v2 /infer at 32 conn",
        (OURS, "grpc-live", 32, "rps"),
        (OURS, "v2-1", 32, "rps"),
        "/",
        None,
    ),
    (
        "/predict 1 instance, 32 conn: req/s vs ours-before (--before)",
        (OURS, "predict-1", 32, "rps"),
        ("ours-before", "predict-1", 32, "rps"),
        "/",
        NO_SLOWER,
    ),
    (
        "/predict 1 instance, 1 conn: p50 minus ours-before's",
        (OURS, "predict-1", 1, "p50_ms"),
        ("ours-before", "predict-1", 1, "p50_ms"),
        "-",
        0.05,
    ),
    (
        "MC T=100 1 instance, 8 conn: req/s vs /predict's",
        (OURS, "mc-100", 8, "rps"),
        (OURS, "predict-1", 8, "rps"),
        "/",
        None,
    ),
    # Issue 18: MC batching across requests and samples "auto".
    (
        "MC T=100 1 instance, 32 conn: req/s vs /predict's",
        (OURS, "mc-100", 32, "rps"),
        (OURS, "predict-1", 32, "rps"),
        "/",
        0.6,
    ),
    (
        "MC T=100 1 instance, 32 conn: req/s vs ours-before's",
        (OURS, "mc-100", 32, "rps"),
        ("ours-before", "mc-100", 32, "rps"),
        "/",
        None,
    ),
    (
        "MC auto, mixed stream, 32 conn: req/s vs ours-before's",
        (OURS, "mc-auto-mixed", 32, "rps"),
        ("ours-before", "mc-auto-mixed", 32, "rps"),
        "/",
        None,
    ),
    (
        "MC auto, mixed stream, 32 conn: req/s vs T=100 on the same stream",
        (OURS, "mc-auto-mixed", 32, "rps"),
        (OURS, "mc-100-mixed", 32, "rps"),
        "/",
        2,
    ),
    (
        "MC T=10 (auto's first stretch alone), mixed stream, 32 conn: req/s vs T=100",
        (OURS, "mc-10-mixed", 32, "rps"),
        (OURS, "mc-100-mixed", 32, "rps"),
        "/",
        None,
    ),
    # What bounds the two above: a request of one sample, the cheapest MC request there is.
    (
        "MC T=1 1 instance, 32 conn: req/s vs /predict's (what any MC request can reach)",
        (OURS, "mc-1", 32, "rps"),
        (OURS, "predict-1", 32, "rps"),
        "/",
        None,
    ),
    (
        "MC T=1, mixed stream, 32 conn: req/s vs T=100 (what auto can reach: it runs at least one stretch)",
        (OURS, "mc-1-mixed", 32, "rps"),
        (OURS, "mc-100-mixed", 32, "rps"),
        "/",
        None,
    ),
    (
        "MC auto, mixed stream of 32-instance requests, 32 conn: req/s vs T=100 on the same stream",
        (OURS, "mc-auto-mixed-32", 32, "rps"),
        (OURS, "mc-100-mixed-32", 32, "rps"),
        "/",
        None,
    ),
]


def ratios(runs: list[dict]) -> list[dict]:
    """The acceptance figures from one run's numbers; ``value`` is None where a number is missing."""
    cells = {(r["server"], r["workload"], r["connections"]): r for r in runs}
    entries = []
    for name, (*a_cell, a_key), (*b_cell, b_key), op, target in FIGURES:
        a, b = (cells[tuple(c)][k] if tuple(c) in cells else None for c, k in [(a_cell, a_key), (b_cell, b_key)])
        value = None if a is None or b is None else (a / b if op == "/" else a - b)
        met = None if value is None or target is None else (value >= target if op == "/" else value <= target)
        unit = "req/s" if a_key == "rps" else "ms"
        entries.append(
            {
                "name": name,
                "value": value,
                "target": None if target is None else (f">= {target}x" if op == "/" else f"<= {target} ms"),
                "met": met,
                "from": "—" if value is None else f"{a:,.2f} {op} {b:,.2f} {unit}",
            }
        )
    errors = sum(r["non_2xx"] + r["socket_errors"] for r in runs)
    entries.append(
        {"name": "non-2xx answers and socket errors, all runs", "value": errors, "target": "0", "met": errors == 0}
        | {"from": f"{len(runs)} runs"}
    )
    return entries


def medians(runs: list[dict]) -> list[dict]:
    """One run per cell: the median req/s and latencies over the rounds, the errors summed."""
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        cells.setdefault((run["server"], run["workload"], run["connections"]), []).append(run)
    merged = []
    for (server, workload, connections), rounds in cells.items():
        median = {key: float(np.median([r[key] for r in rounds])) for key in ("rps", "p50_ms", "p99_ms")}
        errors = {key: sum(r[key] for r in rounds) for key in ("non_2xx", "socket_errors")}
        spent = [r["cpu_us_per_request"] for r in rounds if r.get("cpu_us_per_request")]
        median["cpu_us_per_request"] = {k: float(np.median([s[k] for s in spent])) for k in spent[0]} if spent else None
        clients = [r["client_cpu_us_per_request"] for r in rounds if r.get("client_cpu_us_per_request") is not None]
        median["client_cpu_us_per_request"] = float(np.median(clients)) if clients else None
        cell = {"server": server, "workload": workload, "connections": connections, **median, **errors}
        merged.append(cell | {"generator": rounds[0].get("generator", "wrk")})
    return merged


def tables(runs: list[dict], connections: list[int]) -> str:
    """Markdown: req/s, then p50 / p99 latency, one row per server and workload, one column per connection count."""
    cells = {(r["server"], r["workload"], r["connections"]): r for r in runs}
    rows = list(dict.fromkeys((r["server"], r["workload"]) for r in runs))
    header = "| server | request | " + " | ".join(f"{c} conn" for c in connections) + " |"
    rule = "|---|---|" + "---:|" * len(connections)
    out = []

    def throughput(r: dict) -> str:
        errors = r["non_2xx"] + r["socket_errors"]
        return f"{r['rps']:,.0f}" + (f" ({errors} errors)" if errors else "")

    def cpu_time(r: dict) -> str:
        spent = r.get("cpu_us_per_request")
        return f"{spent['loop']:.0f} + {spent['other']:.0f}" if spent else "—"

    def client_time(r: dict) -> str:
        spent = r.get("client_cpu_us_per_request")
        return "—" if spent is None else f"{spent:.0f} ({r.get('generator', 'wrk')})"

    for title, show in [
        ("req/s", throughput),
        ("latency p50 / p99, ms", lambda r: f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"),
        ("server CPU per request, µs: main (event-loop) thread + all other threads", cpu_time),
        ("load generator CPU per request, µs (and which generator)", client_time),
    ]:
        out += [f"\n{title}\n", header, rule]
        for server, workload in rows:
            values = [show(cells[server, workload, c]) if (server, workload, c) in cells else "" for c in connections]
            out.append(f"| {server} | {workload} | " + " | ".join(values) + " |")
    return "\n".join(out)


def ratio_table(entries: list[dict]) -> str:
    mark = {True: "yes", False: "**no**", None: "—"}
    lines = ["| figure | value | from | target | met |", "|---|---:|---|---|---|"]
    for e in entries:
        value = "—" if e["value"] is None else f"{e['value']:.2f}" if isinstance(e["value"], float) else str(e["value"])
        lines.append(f"| {e['name']} | {value} | {e['from']} | {e['target'] or '—'} | {mark[e['met']]} |")
    return "\n".join(lines)


def round_table(per_round: list[list[dict]]) -> str:
    lines = ["| figure | " + " | ".join(f"round {k}" for k in range(1, len(per_round) + 1)) + " |"]
    lines.append("|---|" + "---:|" * len(per_round))
    for i, entry in enumerate(per_round[0]):
        values = [figures[i]["value"] for figures in per_round]
        shown = ["—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in values]
        lines.append(f"| {entry['name']} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def describe_run(args: argparse.Namespace, version_dir: Path) -> dict:
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "model": str(version_dir),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wrk": wrk_version.strip(),
        "grpc_load_generator": grpc_generator(args.grpc_generator),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "mc_connections": args.mc_connections,
        "mixed_connections": args.mixed_connections,
        "rounds": args.rounds,
        "load_average_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts", help="model repository")
    parser.add_argument("--model", default="digits", help="model name (its latest version is served)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=SERVERS)
    parser.add_argument(
        "--before", default=BEFORE, help=f"ours-before: a commit (default {BEFORE}) or a source tree of the code before"
    )
    parser.add_argument("--connections", type=int, nargs="+", help="for predict-* (default 1 8 32 64; quick 1 8 32)")
    parser.add_argument("--mc-connections", type=int, nargs="+", help="for mc-100 (default 1 8 32 64; quick 1 8)")
    parser.add_argument("--mixed-connections", type=int, nargs="+", default=[32], help="for mc-*-mixed (32)")
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per workload (default 3; quick 1)")
    parser.add_argument(
        "--grpc-generator",
        choices=["auto", *GRPC_GENERATORS],
        default="auto",
        help="gRPC load generator: h2load, python (bench/grpc_load.py), or auto: h2load where installed",
    )
    parser.add_argument("--quick", action="store_true", help="short measurements, fewer connection counts")
    parser.add_argument("--rounds", type=int, default=1, help="measure every server this many times (medians)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process timings (quick skips them)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/serving-<UTC time>.json)")
    args = parser.parse_args(argv)
    args.connections = args.connections or ([1, 8, 32] if args.quick else [1, 8, 32, 64])
    args.mc_connections = args.mc_connections or ([1, 8] if args.quick else [1, 8, 32, 64])
    args.duration = args.duration or (2 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 3)
    args.in_process = not (args.quick or args.no_in_process)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out = args.out or ROOT / "bench" / "results" / f"serving-{stamp}.json"
    args.model_dir = args.model_dir.resolve()
    if args.before is None:
        args.servers = [name for name in args.servers if name != "ours-before"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk.require_wrk()
    if args.grpc_generator == "h2load" and not h2load.available():
        raise SystemExit(h2load.INSTALL_HINT)
    from training import artifact

    versions = artifact.versions(args.model_dir / args.model)
    if not versions:
        raise SystemExit(f"no {args.model} model in {args.model_dir}: run `python -m training --if-missing` first")
    version_dir = args.model_dir / args.model / str(versions[-1])
    results: dict = {"run": describe_run(args, version_dir), "servers": {}, "runs": []}
    print(f"model {version_dir}, {os.cpu_count()} CPUs, commit {results['run']['commit'][:10]}", flush=True)
    reference: dict = {}  # the first server's inference-mode answers, which every other must match
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(1, args.rounds + 1):
            for name in args.servers:
                if results["servers"].get(name, {}).get("status") == "failed":
                    continue
                status: dict = {"load_average_before": os.getloadavg()}
                server = None
                started = time.monotonic()
                try:
                    server = build(name, args, version_dir, Path(scratch))
                    status["description"] = server.description
                    if name == "mlserver":
                        status["versions"] = servers.mlserver_version(Path(server.command[0]))
                    load = status["load_average_before"][0]
                    results["run"].setdefault("server_start_load_averages", []).append(load)
                    print(f"\n{name}, round {round_}: {server.description} (load average {load:.1f})", flush=True)
                    server.start(args.out.parent / f"{args.out.stem}-logs" / f"{name}-{round_}.log")
                    results["runs"] += [run | {"round": round_} for run in measure(server, args, reference)]
                    status["status"] = "ok"
                except Exception as error:  # one server's failure must not lose the other servers' numbers
                    status.update(status="failed", reason=f"{type(error).__name__}: {error}")
                    print(f"  {name} FAILED: {error}", flush=True)
                finally:
                    if server is not None:
                        server.stop()
                status["seconds"] = round(time.monotonic() - started, 1)
                results["servers"].setdefault(name, status).update(status, rounds=round_)
    if args.in_process:
        results["in_process"] = in_process.measure(version_dir, DIGIT_ZERO, digit_rows(32))
        results["adaptive"] = adaptive.measure(version_dir)
    results["run"]["load_average_end"] = os.getloadavg()
    cells = medians(results["runs"])
    results["ratios"] = ratios(cells)
    rounds = range(1, args.rounds + 1)
    results["ratios_per_round"] = [ratios([r for r in results["runs"] if r["round"] == k]) for k in rounds]

    run = results["run"]
    print(f"\n## Serving benchmark, {run['date']}, commit {run['commit'][:10]}", end="")
    print(" (with uncommitted changes)" if run["uncommitted_changes"] else "")
    loads = run.get("server_start_load_averages", [])  # every server in every round
    print(
        f"\n{run['cpus']} CPUs, {run['duration_s']} s per measurement, wrk (gRPC: {run['grpc_load_generator']}),"
        " one server process at a time;"
        f" 1-minute load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} when the servers started"
        + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    print(tables(cells, sorted({*args.connections, *args.mc_connections, *args.mixed_connections})))
    before = results["servers"].get("ours-before", {}).get("description")
    print("\nacceptance figures (issues 9, 18 and 21), this server with default settings")
    print(f"(ours-before: {before})\n" if before else "")
    print(ratio_table(results["ratios"]))
    if args.rounds > 1:
        print("\nthe same figures round by round\n")
        print(round_table(results["ratios_per_round"]))
    for name, status in results["servers"].items():
        if status["status"] != "ok":
            print(f"\n{name} was not measured: {status['reason']}")
    if args.in_process:
        print("\n" + in_process.report(results["in_process"]))
        print("\n" + adaptive.report(results["adaptive"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out}")
    failed = any(s["status"] != "ok" for s in results["servers"].values())
    return 1 if failed or any(r["non_2xx"] or r["socket_errors"] for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
