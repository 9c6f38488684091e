"""Throughput with 1, 2 and 3 replicas behind HAProxy, side by side in one run.

    python bench/replicas.py [--model-dir artifacts] [--duration 5] [--rounds 3] [--concurrency 16]

Three replicas (`python -m app`, one TensorFlow thread each, like pods with one CPU) serve the digits
model from one repository; for n = 1, 2, 3 an HAProxy in front of the first n gets `concurrency`
connections from ``wrk`` (``apt-get install wrk``: C, so the clients take little of the CPU the
replicas need) for `duration` seconds, first with one-instance `/predict`, then with one-instance
`/predict/mc-dropout` at T = 100. A run straight at one replica (no proxy) gives HAProxy's cost.
All setups are measured in turn, `rounds` times. Besides requests per second, the CPU each party
spent per request (from /proc/<pid>/stat): on a machine with fewer cores than replicas + proxy +
clients, that, not the replica count, sets the ceiling. Machinery shared with
tests/test_replicas.py: tests/cluster.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cluster import HAProxy, Replica  # noqa: E402

from app.schemas import DIGIT_ZERO  # noqa: E402
from bench import wrk  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, body: tuple[str, str], args, pids: dict[str, int]) -> dict:
    path, payload = body
    wrk.run(url + path, payload, args.concurrency, 2)  # warm-up
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    clients_before = children_cpu()
    result = wrk.run(url + path, payload, args.concurrency, args.duration)
    cpu = {who: cpu_seconds(pid) - before[who] for who, pid in pids.items()}
    cpu["clients"] = children_cpu() - clients_before
    assert result.non_2xx == 0 and result.socket_errors == 0, f"{url + path}: {result}"
    seconds = result.requests / result.rps
    return {
        "requests": result.requests,
        "rps": round(result.rps, 1),
        "p50_ms": result.p50_ms,
        "cpu_ms_per_request": {who: round(t / result.requests * 1000, 2) for who, t in cpu.items()},
        "cores_busy": round(sum(cpu.values()) / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (args.model_dir / "digits").is_dir():
        sys.exit(f"no digits model in {args.model_dir}: run `python -m training` first")
    wrk.require_wrk()

    workloads = {
        "predict": ("/predict", json.dumps({"instances": [DIGIT_ZERO]})),
        "mc T=100": (
            "/predict/mc-dropout",
            json.dumps({"instances": [DIGIT_ZERO], "samples": 100, "seed": 1}),
        ),
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    replicas = [
        Replica(args.model_dir.resolve(), logs, f"r{i}", default_model="digits", poll_seconds=0, tf_threads=1)
        for i in range(3)
    ]
    rows = []
    proxies: dict[int, HAProxy] = {}
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        for n in (1, 2, 3):
            (logs / f"haproxy-{n}").mkdir()
            proxies[n] = HAProxy(replicas[:n], logs / f"haproxy-{n}")
            for replica in replicas[:n]:
                proxies[n].wait_up(replica.name)
        pids = {r.name: r.process.pid for r in replicas}
        setups = {"1 replica, direct": (replicas[0].url, {"r0": pids["r0"]})}
        for n, proxy in proxies.items():
            serving = {r.name: pids[r.name] for r in replicas[:n]}
            setups[f"{n} behind HAProxy"] = (proxy.url, {**serving, "haproxy": proxy.process.pid})
        # Rounds through every setup in turn, so that a change in what else runs on the machine
        # hits them all alike; the table gives the median round.
        for round_ in range(args.rounds):
            for setup, (url, watched) in setups.items():
                for name, body in workloads.items():
                    rows.append(
                        {"round": round_, "setup": setup, "workload": name, **measure(url, body, args, watched)}
                    )
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for replica in replicas:
            if replica.alive():
                replica.stop()

    load = os.getloadavg()[0]
    print(
        f"\n{os.cpu_count()} cores, load average {load:.1f} at the end, c = {args.concurrency}, "
        f"{args.duration:g} s per measurement, median of {args.rounds} rounds (range in brackets)"
    )
    print("| setup | workload | req/s | p50 ms | CPU ms per request: replicas / HAProxy / wrk | cores busy |")
    print("|---|---|---|---|---|---|")
    for setup in setups:
        for name in workloads:
            runs = sorted((r for r in rows if r["setup"] == setup and r["workload"] == name), key=lambda r: r["rps"])
            row = runs[len(runs) // 2]
            cpu = row["cpu_ms_per_request"]
            replica_cpu = sum(v for k, v in cpu.items() if k.startswith("r"))
            print(
                f"| {setup} | {name} | {row['rps']:.0f} ({runs[0]['rps']:.0f} to {runs[-1]['rps']:.0f}) | "
                f"{row['p50_ms']:.1f} | {replica_cpu:.2f} / {cpu.get('haproxy', 0):.2f} / {cpu['clients']:.2f} | "
                f"{row['cores_busy']:.2f} |"
            )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
