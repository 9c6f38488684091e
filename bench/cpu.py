"""CPU time a server spends per request, per thread: what its req/s is made of.

Throughput on a shared two-core machine moves with the neighbours; CPU seconds per request move
much less, and per thread they show where a server's time goes (the event loop's thread, the
threads that call TensorFlow, TensorFlow's own). Read from ``/proc`` (Linux) for the server's
process and every child process, before and after one wrk run.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _processes(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return found


def snapshot(pid: int) -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds so far of every thread of the process tree: (pid, tid) -> (thread name, seconds)."""
    threads = {}
    for process in _processes(pid):
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            threads[process, int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return threads


def per_request(before: dict, after: dict, requests: int, pid: int) -> dict[str, float]:
    """Microseconds per request: ``total`` over all threads, ``loop`` for the main thread of ``pid``
    (the event loop of a uvicorn server), ``other`` for the rest."""
    if requests <= 0:
        return {"total": 0.0, "loop": 0.0, "other": 0.0}
    spent = {key: seconds - before.get(key, (name, 0.0))[1] for key, (name, seconds) in after.items()}
    total = sum(spent.values())
    loop = spent.get((pid, pid), 0.0)
    scale = 1e6 / requests
    return {"total": total * scale, "loop": loop * scale, "other": (total - loop) * scale}


def children() -> float:
    """CPU seconds of this process's ended children (the load generators of the runs so far)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def available() -> bool:
    return Path("/proc/self/task").is_dir()
