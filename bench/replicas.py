"""Throughput with 1, 2 and 3 replicas behind HAProxy, side by side in one run.

    python bench/replicas.py [--model-dir artifacts] [--duration 10] [--concurrency 16]

Three uvicorn replicas (one TensorFlow thread each, like pods with one CPU) serve the digits
model from one repository; for n = 1, 2, 3 an HAProxy in front of the first n gets `concurrency`
clients for `duration` seconds, first with one-instance `/predict`, then with one-instance
`/predict/mc-dropout` at T = 100. A run straight at one replica (no proxy) gives HAProxy's cost.
Besides requests per second, the CPU seconds each party spent per 1,000 requests (from
/proc/<pid>/stat): on a machine with fewer cores than replicas + proxy + clients, that, not the
replica count, sets the ceiling. Machinery shared with tests/test_replicas.py: tests/cluster.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cluster import HAProxy, Load, Replica  # noqa: E402

from app.schemas import DIGIT_ZERO  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(url: str, body: tuple[str, bytes], args, pids: dict[str, int]) -> dict:
    Load(url, [body], concurrency=args.concurrency, max_seconds=2).run()  # warm-up
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    client_before = time.process_time()
    result = Load(url, [body], concurrency=args.concurrency, max_seconds=args.duration).run()
    cpu = {who: cpu_seconds(pid) - before[who] for who, pid in pids.items()}
    cpu["clients"] = time.process_time() - client_before
    assert result.failures == 0, f"{dict(result.statuses)} {dict(result.errors)}"
    per_1000 = {who: round(seconds / result.requests * 1000, 2) for who, seconds in cpu.items()}
    return {"requests": result.requests, "rps": round(result.throughput, 1), "cpu_s_per_1000": per_1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if not (args.model_dir / "digits").is_dir():
        sys.exit(f"no digits model in {args.model_dir}: run `python -m training` first")

    workloads = {
        "predict": ("/predict", json.dumps({"instances": [DIGIT_ZERO]}).encode()),
        "mc T=100": (
            "/predict/mc-dropout",
            json.dumps({"instances": [DIGIT_ZERO], "samples": 100, "seed": 1}).encode(),
        ),
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    replicas = [
        Replica(args.model_dir.resolve(), logs, f"r{i}", default_model="digits", poll_seconds=0, tf_threads=1)
        for i in range(3)
    ]
    rows = []
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        pids = {r.name: r.process.pid for r in replicas}
        for name, body in workloads.items():
            rows.append({"setup": "1 replica, direct", "workload": name, **measure(replicas[0].url, body, args, pids)})
        for n in (1, 2, 3):
            proxy = HAProxy(replicas[:n], logs)
            try:
                for replica in replicas[:n]:
                    proxy.wait_up(replica.name)
                for name, body in workloads.items():
                    result = measure(proxy.url, body, args, {**pids, "haproxy": proxy.process.pid})
                    rows.append({"setup": f"{n} behind HAProxy", "workload": name, **result})
            finally:
                proxy.stop()
    finally:
        for replica in replicas:
            if replica.alive():
                replica.stop()

    load = os.getloadavg()[0]
    print(f"\n{os.cpu_count()} cores, load average {load:.1f}, c = {args.concurrency}, {args.duration:g} s each")
    print("| setup | workload | req/s | CPU s per 1,000 requests: replicas / HAProxy / clients |")
    print("|---|---|---|---|")
    for row in rows:
        cpu = row["cpu_s_per_1000"]
        replica_cpu = sum(v for k, v in cpu.items() if k.startswith("r"))
        print(
            f"| {row['setup']} | {row['workload']} | {row['rps']:.0f} | "
            f"{replica_cpu:.2f} / {cpu.get('haproxy', 0):.2f} / {cpu['clients']:.2f} |"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
