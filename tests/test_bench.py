"""bench/serving.py: its pieces run against a tiny model and produce complete, error-free results.

No timing is asserted: numbers from a shared machine mean nothing in a test. What is checked is
that every server starts, answers like the others, is measured for every workload and
connection count asked for, and that no answer was an error.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import cpu, servers, serving, wrk
from bench.serving import free_port

ROOT = Path(__file__).resolve().parents[1]


def run_bench(repository: Path, out: Path, *args: str) -> dict:
    command = [sys.executable, "bench/serving.py", "--quick", "--duration", "1", "--warmup", "1"]
    command += ["--model-dir", str(repository), "--model", "tiny", "--out", str(out), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| server | request |" in result.stdout  # the markdown tables
    return json.loads(out.read_text())


def assert_complete(results: dict, expected: set[tuple[str, str, int]]) -> None:
    assert all(status["status"] == "ok" for status in results["servers"].values()), results["servers"]
    cells = {(r["server"], r["workload"], r["connections"]) for r in results["runs"]}
    assert cells == expected
    for run in results["runs"]:
        assert run["requests"] > 0 and run["rps"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"], run
        assert run["non_2xx"] == 0 and run["socket_errors"] == 0, run
        spent = run["cpu_us_per_request"]  # read from /proc for the server's threads
        assert spent["loop"] > 0 and spent["total"] >= spent["loop"], run
        assert run["client_cpu_us_per_request"] > 0, run  # wrk's or bench/grpc_load.py's own CPU


MC_ONE_ROW = ("mc-100", "mc-1")
"""MC workloads of one digit per request, at the --mc-connections counts; the streams are at --mixed-connections."""
MC_FIXED_STREAMS = ("mc-100-mixed", "mc-10-mixed", "mc-1-mixed", "mc-100-mixed-32")
MC_AUTO_STREAMS = ("mc-auto-mixed", "mc-auto-mixed-32")


def test_quick_run_measures_every_server_and_workload(tiny_classifier_dir, tmp_path):
    assert shutil.which("wrk"), wrk.INSTALL_HINT
    repository = tiny_classifier_dir.parents[1]
    servers = ["floor", "minimal", "ours-unbatched", "ours-batched"]
    before = tmp_path / "before"  # this tree again, standing in for the code before a change
    shutil.copytree(ROOT / "app", before / "app")
    shutil.copytree(ROOT / "training", before / "training")
    arguments = ["--connections", "1", "8", "--mixed-connections", "8", "--before", str(before)]
    results = run_bench(repository, tmp_path / "r.json", "--servers", *servers, "ours-before", *arguments)
    predict = [("predict-1", c) for c in (1, 8)] + [("predict-32", c) for c in (1, 8)]
    expected = {("floor", "predict-1", c) for c in (1, 8)} | {("minimal", w, c) for w, c in predict}
    mc = [(w, c) for w in MC_ONE_ROW for c in (1, 8)] + [(w, 8) for w in (*MC_FIXED_STREAMS, *MC_AUTO_STREAMS)]
    for ours in [*servers[2:], "ours-before"]:  # the before tree is this one's code: it has auto
        expected |= {(ours, w, c) for w, c in [*predict, *mc]}
    grpc_workloads = ("v2-1", "grpc-v2-1", "grpc-v2-1-conns", "grpc-live")
    expected |= {("ours-batched", w, c) for w in grpc_workloads for c in (1, 8)}  # the default
    assert_complete(results, expected)
    assert results["run"]["model"] == str(tiny_classifier_dir)
    figures = {f["name"]: f for f in results["ratios"]}
    assert figures["MC T=100 1 instance, 8 conn: req/s vs /predict's"]["value"] > 0
    assert figures["non-2xx answers and socket errors, all runs"]["met"] is True


def test_wrk_result_line_is_read():
    result = wrk.parse("Running 1s test\nRESULT 1.500000 9.250000 2.000000 3000 1500000 2 1 0 0 3\n")
    assert (result.p50_ms, result.p99_ms, result.mean_ms, result.requests) == (1.5, 9.25, 2.0, 3000)
    assert result.rps == 2000 and result.non_2xx == 2 and result.socket_errors == 4


def test_ratios_follow_the_acceptance_figures():
    def run(server, workload, connections, rps, p50=1.0):
        return dict(server=server, workload=workload, connections=connections, rps=rps, p50_ms=p50)

    runs = [
        run("floor", "predict-1", 32, 1000),
        run("ours-batched", "predict-1", 32, 900),
        run("floor", "predict-1", 1, 500, p50=0.5),
        run("ours-batched", "predict-1", 1, 400, p50=2.0),
    ]
    runs = [{**r, "non_2xx": 0, "socket_errors": 0} for r in runs]
    runs[0]["non_2xx"] = 3
    figures = {f["name"]: f for f in serving.ratios(runs)}
    assert figures["/predict 1 instance, 32 conn: req/s vs floor"]["value"] == pytest.approx(0.9)
    assert figures["/predict 1 instance, 32 conn: req/s vs floor"]["met"] is True
    assert figures["/predict 1 instance, 1 conn: p50 minus floor p50"]["value"] == pytest.approx(1.5)
    assert figures["/predict 1 instance, 1 conn: p50 minus floor p50"]["met"] is False
    missing = figures["/predict 1 instance, 32 conn: req/s vs MLServer"]
    assert missing["value"] is None and missing["met"] is None
    assert figures["non-2xx answers and socket errors, all runs"]["value"] == 3
    assert figures["non-2xx answers and socket errors, all runs"]["met"] is False


def test_medians_take_each_cell_over_the_rounds():
    def run(round_, rps, p50, errors=0):
        cell = dict(server="floor", workload="predict-1", connections=32, round=round_)
        return cell | dict(rps=rps, p50_ms=p50, p99_ms=2 * p50, non_2xx=errors, socket_errors=0)

    (cell,) = serving.medians([run(1, 1000, 1.0), run(2, 400, 3.0, errors=2), run(3, 900, 2.0)])
    assert (cell["rps"], cell["p50_ms"], cell["p99_ms"]) == (900, 2.0, 4.0)
    assert cell["non_2xx"] == 2  # errors from every round count


def test_rounds_measure_every_server_again(tiny_classifier_dir, tmp_path):
    repository = tiny_classifier_dir.parents[1]
    args = ["--servers", "floor", "ours-batched", "--connections", "8", "--mc-connections", "1", "--rounds", "2"]
    args += ["--grpc-generator", "python"]  # the fallback where h2load is missing
    results = run_bench(repository, tmp_path / "r.json", *args, "--mixed-connections", "1")
    assert {r["generator"] for r in results["runs"] if r["workload"].startswith("grpc")} == {"bench/grpc_load.py"}
    assert results["run"]["grpc_load_generator"] == "bench/grpc_load.py"
    rounds = {(r["server"], r["workload"], r["connections"], r["round"]) for r in results["runs"]}
    cells = {("floor", "predict-1", 8), ("ours-batched", "predict-1", 8), ("ours-batched", "predict-32", 8)}
    cells |= {("ours-batched", w, 1) for w in (*MC_ONE_ROW, *MC_FIXED_STREAMS, *MC_AUTO_STREAMS)}
    cells |= {("ours-batched", w, 8) for w in ("v2-1", "grpc-v2-1", "grpc-v2-1-conns", "grpc-live")}
    assert rounds == {(*cell, k) for cell in cells for k in (1, 2)}
    assert len(results["ratios_per_round"]) == 2
    assert [f["name"] for f in results["ratios_per_round"][1]] == [f["name"] for f in results["ratios"]]


def test_cpu_per_request_splits_the_event_loop_thread_from_the_others():
    before = {(7, 7): ("python", 1.0), (7, 8): ("tf_Compute", 0.5), (9, 9): ("child", 0.0)}
    after = {(7, 7): ("python", 1.3), (7, 8): ("tf_Compute", 0.6), (9, 9): ("child", 0.1), (7, 10): ("new", 0.05)}
    spent = cpu.per_request(before, after, requests=1000, pid=7)
    assert spent == pytest.approx({"loop": 300.0, "other": 250.0, "total": 550.0})
    assert cpu.per_request(before, after, requests=0, pid=7)["total"] == 0


def test_cpu_snapshot_reads_this_process():
    assert cpu.available()
    threads = cpu.snapshot(os.getpid())
    assert (os.getpid(), os.getpid()) in threads and all(seconds >= 0 for _, seconds in threads.values())


def test_grpc_and_the_pre_refactor_server_are_measured_beside_rest(tiny_classifier_dir, tmp_path):
    """gRPC ModelInfer (h2load where installed, else bench/grpc_load.py) and REST v2 on this server, /predict on
    a worktree of the commit before the refactor, all in one run with no error; their figures are computed."""
    repository = tiny_classifier_dir.parents[1]
    args = ["--servers", "ours-batched", "ours-before", "--connections", "1", "8", "--mc-connections", "1"]
    results = run_bench(repository, tmp_path / "r.json", *args, "--mixed-connections", "1")
    workloads = ("predict-1", "predict-32", "v2-1", "grpc-v2-1", "grpc-v2-1-conns", "grpc-live")
    expected = {("ours-batched", w, c) for w in workloads for c in (1, 8)}
    expected |= {("ours-before", w, c) for w in ("predict-1", "predict-32") for c in (1, 8)}
    expected |= {("ours-batched", w, 1) for w in (*MC_ONE_ROW, *MC_FIXED_STREAMS, *MC_AUTO_STREAMS)}
    expected |= {("ours-before", w, 1) for w in (*MC_ONE_ROW, *MC_FIXED_STREAMS)}  # fixed T only
    assert_complete(results, expected)
    grpc_generator = "h2load" if shutil.which("h2load") else "bench/grpc_load.py"
    for run in results["runs"]:
        assert run["generator"] == (grpc_generator if run["workload"].startswith("grpc") else "wrk"), run
    assert "38c439a" in results["servers"]["ours-before"]["description"]
    figures = {f["name"]: f for f in results["ratios"]}
    assert figures["gRPC ModelInfer 1 instance, 1 call: p50 minus REST v2 /infer's"]["value"] is not None
    assert "before" not in subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout


def test_grpc_load_result_line_reads_like_wrk():
    from bench import grpc_load

    line = asyncio.run(grpc_load.load(free_port(), "/x.Y/Z", b"", 2, 0.2, 0, 10))
    result = wrk.parse(line)  # nothing listens: every call fails, and is counted
    assert result.requests == 0 and 0 < result.non_2xx <= 10  # bounded by max_calls


def test_h2load_summary_and_call_log_read_like_wrk():
    from bench import h2load

    assert h2load.framed(b"abc") == b"\0\0\0\0\x03abc"
    output = "finished in 2.00s, 1500.00 req/s, 1MB/s\nrequests: 3010 total, 3042 started, 3010 done, "
    output += "3000 succeeded, 10 failed, 0 errored, 0 timeout\n"
    calls = np.array([[1, 200, 1000 + 10 * i] for i in range(3000)] + [[1, 503, 5] for _ in range(10)])
    statuses = {"200": 2990.0, "404": 2.0, "499": 40.0}  # 40 abandoned calls, 32 can be h2load's own
    result = h2load.parse(output, calls, statuses, in_flight=32)
    assert result.requests == 3000 and result.rps == 1500
    assert result.p50_ms == pytest.approx(np.percentile(1 + 0.01 * np.arange(3000), 50))
    assert result.non_2xx == 10 + 2 + 8 and result.socket_errors == 0


def test_http2_floor_servers_each_answer_a_real_grpc_call():
    """bench/http2_floor.py --check: grpcio's server, h2 (default and lean) and ours each start in their own
    process and answer grpcio's ServerLive call with OK and live (the script exits 1 otherwise)."""
    command = [sys.executable, "bench/http2_floor.py", "--check"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("grpcio", "h2", "h2-lean", "ours"):
        assert f"{name}: ServerLive answered OK, live" in done.stdout


def test_http2_floor_without_h2load_says_how_to_install_it(tmp_path):
    environment = {**os.environ, "PATH": str(tmp_path)}  # no h2load on it
    done = subprocess.run(
        [sys.executable, "bench/http2_floor.py"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "h2load is not installed" in done.stderr and "nghttp2-client" in done.stderr


def test_mc_graph_checks_the_bits_and_times_both_checkouts():
    command = [sys.executable, "bench/mc_graph.py", "--before", "HEAD~0", "--rounds", "1"]  # a ref, not a name
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "samples equal bit for bit: True" in done.stdout
    timed = [line for line in done.stdout.splitlines() if line.startswith("round 1")]
    assert len(timed) == 2 and all(float(line.split()[-2]) > 0 for line in timed), done.stdout


def test_mc_finish_checks_the_bodies_and_times_both_checkouts(calibrated_classifier_dir):
    command = [sys.executable, "bench/mc_finish.py", "--before", "HEAD", "--rounds", "1", "--jobs", "3"]
    command += ["--version-dir", str(calibrated_classifier_dir)]  # conformal sets and abstention in the bodies
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 jobs x T = 100: response bodies equal byte for byte: True" in done.stdout
    timed = [line for line in done.stdout.splitlines() if line.startswith("round 1")]
    assert len(timed) == 2 and all(float(line.split()[-1]) > 0 for line in timed), done.stdout


def test_a_stream_is_cut_into_requests_of_its_size():
    rows = [[float(i)] * 2 for i in range(5)]
    bodies = servers._native(servers.Workload("w", rows, samples="auto", stream=True, per_request=2))
    assert [json.loads(b)["instances"] for b in bodies] == [rows[0:2], rows[2:4], rows[4:5]]
    assert {json.loads(b)["samples"] for b in bodies} == {"auto"}
    assert [json.loads(b)["instances"] for b in servers._native(servers.Workload("w", rows, stream=True))] == [
        [row] for row in rows
    ]
