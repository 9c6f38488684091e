"""Replicas of the service behind HAProxy on loopback, and a bounded load generator.

The replica test (tests/test_replicas.py) and the scaling benchmark (bench/replicas.py) share
this. Each replica is a real ``python -m app`` process (the image's command) on its own port,
all reading one model repository, as pods reading one volume; HAProxy (Debian's ``haproxy``)
stands in for the Service / ingress.

HAProxy settings that make a replica's restart cost no request (``haproxy_config``):

- ``option httpchk GET /health/ready`` with ``inter 500ms fall 2 rise 2``: a replica that stops
  listening or answers 503 (models not loaded yet) is out of rotation within a second, and back
  after two good checks in a row, i.e. only once it is really serving. ``timeout check 2s``: a
  replica busy with a queue of requests answers its check late, not never; with the default
  (``inter``) it would be thrown out for being loaded, and with one replica that is a 503 for all.
- ``retries 3`` + ``option redispatch 1``: a request whose connection is refused (the replica got
  SIGTERM and closed its socket before the check noticed) is retried on *another* replica.
- ``retry-on conn-failure empty-response junk-response response-timeout 503``: also retry when a
  kept-alive connection is closed under the request (uvicorn closes idle keep-alive connections
  when it drains) or a replica answers 503. Our POSTs are pure functions of the body (seeded MC
  included), so replaying one is safe.
- ``option http-buffer-request``: HAProxy can only replay a request it still holds in full.
- No ``on-marked-down shutdown-sessions``: in-flight requests on a replica that goes down finish
  there; uvicorn drains them after SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, deadline: float, alive: Callable[[], bool] = lambda: True, what: str = "") -> None:
    """Until ``url`` answers 200."""
    while time.monotonic() < deadline:
        assert alive(), f"{what} exited"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 in time ({what})")


class Replica:
    """One ``python -m app`` process serving ``model_dir`` on its own loopback port; restartable."""

    def __init__(self, model_dir: Path, logs: Path, name: str, **settings: object) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DROPOUT_SERVE_MODEL_DIR": str(model_dir)}
        self.env.update({"DROPOUT_SERVE_HOST": "127.0.0.1", "DROPOUT_SERVE_PORT": str(self.port)})
        self.env.update({f"DROPOUT_SERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = logs / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            # The image's command: uvicorn with the settings' host, port, workers and drain limit.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 300) -> None:
        wait_for(f"{self.url}/health/ready", time.monotonic() + timeout, self.alive, f"replica {self.name}")

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM, as the kubelet sends it; whether uvicorn drained and shut down cleanly.

        uvicorn re-raises the signal after its graceful shutdown, so the exit status is "killed by
        SIGTERM" either way; its last log line tells a finished shutdown from an interrupted one.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return False
        return code in (0, -signal.SIGTERM) and "Finished server process" in self.tail()

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""


def haproxy_config(port: int, replicas: list[Replica], socket_path: Path) -> str:
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
    return f"""\
global
    log stderr format raw local0 notice
    maxconn 1024
    stats socket {socket_path} mode 600 level operator

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout check 2s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response response-timeout 503
    option http-buffer-request

frontend replicas
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk GET /health/ready
    http-check expect status 200
    option log-health-checks
    default-server inter 500ms fastinter 250ms downinter 500ms rise 2 fall 2
{servers}
"""


def haproxy_binary() -> str:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(binary).exists(), "haproxy is not installed: apt-get install haproxy (.ci/run does)"
    return binary


class HAProxy:
    """``haproxy -db`` in the foreground on a loopback port, in front of ``replicas``."""

    def __init__(self, replicas: list[Replica], logs: Path) -> None:
        binary = haproxy_binary()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = logs / "haproxy.cfg"
        self.socket = logs / "haproxy.sock"
        config.write_text(haproxy_config(self.port, replicas, self.socket))
        check = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = logs / "haproxy.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, str]:
        """Each replica's state as HAProxy's health checks see it: "UP", "DOWN", ..."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        columns = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(columns, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "replicas" and r["svname"] != "BACKEND"}

    def wait_up(self, name: str, timeout: float = 30) -> None:
        """Until HAProxy sends traffic to replica ``name`` again (two good checks in a row)."""
        deadline = time.monotonic() + timeout
        state = None
        while state != "UP":
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"HAProxy still sees {name} as {state}"
            time.sleep(0.1)
            try:
                state = self.status().get(name)
            except OSError:  # the stats socket is not there yet
                state = None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)

    @property
    def failures(self) -> int:
        return sum(self.errors.values()) + sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class Load:
    """``concurrency`` clients sending ``requests`` in turn (a list of (path, body) pairs) to
    ``url`` until ``stop()``, ``max_requests`` or ``max_seconds``, whichever comes first."""

    def __init__(
        self,
        url: str,
        requests: list[tuple[str, bytes]],
        concurrency: int = 16,
        max_requests: int = 100_000,
        max_seconds: float = 120,
    ) -> None:
        self.url, self.requests, self.concurrency = url, requests, concurrency
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout=self.max_seconds + 60)
        return self.result

    async def _run(self) -> None:
        result, sent = self.result, 0
        deadline = time.monotonic() + self.max_seconds
        headers = {"content-type": "application/json"}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)

        async def client(worker: int, http: httpx.AsyncClient) -> None:
            nonlocal sent
            while not self._stop.is_set() and time.monotonic() < deadline and sent < self.max_requests:
                path, body = self.requests[(sent + worker) % len(self.requests)]
                sent += 1
                try:
                    response = await http.post(path, content=body, headers=headers)
                    result.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        result.versions[response.json().get("version")] += 1
                except httpx.HTTPError as e:
                    result.errors[type(e).__name__] += 1
                result.requests += 1

        start = time.monotonic()
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as http:
            await asyncio.gather(*(client(i, http) for i in range(self.concurrency)))
        result.seconds = time.monotonic() - start
