"""The Python an MC worker thread runs per batched call, this checkout against another commit's, side by side.

    python bench/mc_finish.py --before e75dda0 [--jobs 24] [--samples 100] [--rounds 5]

Under load the MC service is GIL-bound: per call of ~24 one-instance requests, a worker thread draws them
(``mc_dropout_segments``, ``training.signatures.segment_draws``), prepares them together (``app.summaries``) and
finishes each (``app.dataplane._answer`` and the native body). This times exactly that, through the real data
plane on a real version (default ``artifacts/digits/1``), in one process per checkout: thread CPU of the draw
and of the prepare + finishes (``app.mc_batcher._finish_each``), per job, the best of a few batches, one
TensorFlow thread as the server runs it. The two processes are measured in turn, round after round, so the
ratio compares the same machine load; they first check that every job's response body is the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(version_dir: Path, jobs: int, samples: int, best_of: Callable[..., float]) -> None:
    """In a checkout's process (its root first on ``sys.path``): answer ``measure`` lines with timings."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from sklearn.datasets import load_digits

    from app import dataplane
    from app.loading import load_version
    from app.mc_batcher import _finish_each, _Job
    from app.monte_carlo import MonteCarlo
    from app.protocols.native import _mc_answer
    from app.summaries import Summarizer
    from training.signatures import Segment

    model = load_version(version_dir.parent.name, version_dir)
    draw = model.runner._segments._draw
    rows = load_digits().data.astype(np.float32)
    answer_takes_rows = "batch" in inspect.signature(dataplane._answer).parameters  # the code before e75dda0
    batch = []
    for seed in range(jobs):
        segment = Segment(rows[seed : seed + 1], seed, 0, samples)
        head = (model, segment.inputs) if answer_takes_rows else (model,)
        finish = partial(dataplane._answer, *head, samples, seed, MonteCarlo(samples, seed), _mc_answer)
        batch.append(_Job(segment, finish, Summarizer(model), None, samples))
    segments = [job.segment for job in batch]
    drawn = draw(segments)
    bodies = b"".join(result.encoded.body for _, result in _finish_each(batch, drawn))
    print(json.dumps({"bodies": hashlib.sha256(bodies).hexdigest()}), flush=True)
    cpu_us = partial(best_of, repeat=5, number=20, clock=time.thread_time)
    for _ in sys.stdin:
        timings = {"draw": cpu_us(lambda: draw(segments)), "finish": cpu_us(lambda: _finish_each(batch, drawn))}
        print(json.dumps({name: ms * 1000 / jobs for name, ms in timings.items()}), flush=True)


def _checkout(commit: str, into: Path) -> Path:
    """``app`` and ``training`` of ``commit`` in ``into``."""
    archive = subprocess.run(["git", "archive", commit, "app", "training"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _start(tree: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), "--version-dir", args.version_dir]
    command += ["--jobs", str(args.jobs), "--samples", str(args.samples)]
    return subprocess.Popen(command, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ask(process: subprocess.Popen) -> dict:
    process.stdin.write("measure\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="e75dda0", help="the commit to compare with")
    parser.add_argument("--version-dir", default=str(ROOT / "artifacts" / "digits" / "1"))
    parser.add_argument("--jobs", type=int, default=24, help="one-instance requests per call")
    parser.add_argument("--samples", type=int, default=100, help="T of each request")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        from bench.in_process import best_of  # this checkout's, whichever tree is measured

        sys.path[0] = args.worker  # the measured tree's app and training
        _worker(Path(args.version_dir), args.jobs, args.samples, best_of)
        return 0
    trees = {"before": _checkout(args.before, Path(tempfile.mkdtemp())), "this checkout": ROOT}
    processes = {name: _start(tree, args) for name, tree in trees.items()}
    try:
        bodies = {name: json.loads(process.stdout.readline())["bodies"] for name, process in processes.items()}
        same = len(set(bodies.values())) == 1
        print(f"{args.jobs} jobs x T = {args.samples}: response bodies equal byte for byte: {same}")
        found: dict[str, list[dict]] = {name: [] for name in processes}
        for round_ in range(args.rounds):
            for name, process in processes.items():
                found[name].append(_ask(process))
                timed = "  ".join(f"{part} {us:6.1f}" for part, us in found[name][-1].items())
                print(f"round {round_ + 1}  {name:14s} us/job: {timed}", flush=True)
    finally:
        for process in processes.values():
            process.stdin.close()
            process.wait()
    before, after = ({part: statistics.median(r[part] for r in found[n]) for part in found[n][0]} for n in trees)
    for part, us in before.items():
        print(
            f"median {part:6s} before {us:5.1f}  this checkout {after[part]:5.1f} us/job  ratio {after[part] / us:.2f}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
