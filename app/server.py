"""Running the service under uvicorn: one process, or several sharing one socket, and the ``ready`` line.

uvicorn logs "running on" when it binds, which for several workers is before any model is
loaded. The ``ready: http://…/docs`` line comes once requests are really answered: a single
server says so when its start-up (the models' loading and warm-up) is done and it listens; a
supervisor of several says so when every worker reports its start-up done.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from socket import socket

import uvicorn
from uvicorn.supervisors import Multiprocess

from app.settings import Settings

log = logging.getLogger("dropout_serve")

GRACEFUL_SHUTDOWN_SECONDS = 30
"""In-flight requests get this long to finish after SIGTERM (deploy/ sizes its grace periods on it)."""

STARTUP_FAILURE = 3  # uvicorn's exit code when the app cannot start


def announce(host: str, port: int) -> None:
    shown = "localhost" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    log.info("ready: http://%s:%d/docs", shown, port)


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            announce(self.config.host, self.servers[0].sockets[0].getsockname()[1])


class _Workers(Multiprocess):
    """uvicorn's supervisor, which also says ``ready`` once every worker has started."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)
        self.port = sockets[0].getsockname()[1]
        self.announced = False

    def keep_subprocess_alive(self) -> None:  # called every 0.5 s by the supervisor's loop
        super().keep_subprocess_alive()
        if self.announced or self.should_exit.is_set():
            return
        if all(process.is_ready(timeout=1) for process in self.processes):
            self.announced = True
            announce(self.config.host, self.port)


def run(settings: Settings) -> int:
    """Serve ``app.main:app`` until SIGTERM or SIGINT; the exit code for the shell."""
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found
    # here; exiting with 0 tells supervisors (docker stop, systemd) the stop was clean.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = uvicorn.Config(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # uvicorn's 5 s default races clients and proxies that keep idle connections longer
        # (httpx 5 s, AWS ALB 60 s): a request sent as the server closes the connection is lost.
        timeout_keep_alive=settings.keep_alive_seconds,
    )
    if config.workers > 1:
        _Workers(config, sockets=[config.bind_socket()]).run()
        return 0
    server = _Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else STARTUP_FAILURE
