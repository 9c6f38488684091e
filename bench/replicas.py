"""Throughput with 1, 2 and 3 replicas behind HAProxy, side by side in one run.

    python bench/replicas.py [--model-dir artifacts] [--duration 10] [--concurrency 16]

Three replicas (`python -m app`, one TensorFlow thread each, like pods with one CPU) serve the digits
model from one repository; for n = 1, 2, 3 an HAProxy in front of the first n gets `concurrency`
connections from ``wrk`` (``apt-get install wrk``: C, so the clients take little of the CPU the
replicas need) for `duration` seconds, first with one-instance `/predict`, then with one-instance
`/predict/mc-dropout` at T = 100. A run straight at one replica (no proxy) gives HAProxy's cost.
Besides requests per second, the CPU seconds each party spent per 1,000 requests (from
/proc/<pid>/stat): on a machine with fewer cores than replicas + proxy + clients, that, not the
replica count, sets the ceiling. Machinery shared with tests/test_replicas.py: tests/cluster.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cluster import HAProxy, Replica  # noqa: E402

from app.schemas import DIGIT_ZERO  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %f %f %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk(url: str, body: bytes, connections: int, seconds: float, scratch: Path) -> dict:
    script = scratch / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=body.decode()))
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    requests, duration, p50, errors = line.split()[1:]
    assert int(errors) == 0, f"{url}: {errors} failed or non-2xx requests"
    return {"requests": int(requests), "seconds": float(duration), "p50_ms": float(p50)}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, body: tuple[str, bytes], args, pids: dict[str, int], scratch: Path) -> dict:
    path, payload = body
    wrk(url + path, payload, args.concurrency, 2, scratch)  # warm-up
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    clients_before = children_cpu()
    result = wrk(url + path, payload, args.concurrency, args.duration, scratch)
    cpu = {who: cpu_seconds(pid) - before[who] for who, pid in pids.items()}
    cpu["clients"] = children_cpu() - clients_before
    per_1000 = {who: round(seconds / result["requests"] * 1000, 2) for who, seconds in cpu.items()}
    rps = round(result["requests"] / result["seconds"], 1)
    busy = round(sum(cpu.values()) / result["seconds"], 2)
    return {
        "requests": result["requests"],
        "rps": rps,
        "p50_ms": result["p50_ms"],
        "cpu_s_per_1000": per_1000,
        "cores_busy": busy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if not (args.model_dir / "digits").is_dir():
        sys.exit(f"no digits model in {args.model_dir}: run `python -m training` first")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

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
            direct = measure(replicas[0].url, body, args, {"r0": pids["r0"]}, logs)
            rows.append({"setup": "1 replica, direct", "workload": name, **direct})
        for n in (1, 2, 3):
            proxy = HAProxy(replicas[:n], logs)
            try:
                for replica in replicas[:n]:
                    proxy.wait_up(replica.name)
                for name, body in workloads.items():
                    serving = {r.name: pids[r.name] for r in replicas[:n]}
                    result = measure(proxy.url, body, args, {**serving, "haproxy": proxy.process.pid}, logs)
                    rows.append({"setup": f"{n} behind HAProxy", "workload": name, **result})
            finally:
                proxy.stop()
    finally:
        for replica in replicas:
            if replica.alive():
                replica.stop()

    load = os.getloadavg()[0]
    print(f"\n{os.cpu_count()} cores, load average {load:.1f}, c = {args.concurrency}, {args.duration:g} s each")
    print("| setup | workload | req/s | p50 ms | CPU s per 1,000 requests: replicas / HAProxy / wrk | cores busy |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cpu = row["cpu_s_per_1000"]
        replica_cpu = sum(v for k, v in cpu.items() if k.startswith("r"))
        print(
            f"| {row['setup']} | {row['workload']} | {row['rps']:.0f} | {row['p50_ms']:.1f} | "
            f"{replica_cpu:.2f} / {cpu.get('haproxy', 0):.2f} / {cpu['clients']:.2f} | {row['cores_busy']:.2f} |"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
