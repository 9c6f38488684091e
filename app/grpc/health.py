"""``grpc.health.v1``: what ``/health/ready`` and ``/health/live`` say, for Kubernetes gRPC probes.

Service ``""`` (a probe that names none), ``"ready"`` and each door's service name are SERVING
while a version of the default model serves, NOT_SERVING before (and while it does not);
``"live"`` is SERVING as long as the process answers. A ``Check`` reads the data plane at once;
``Watch`` streams follow it within ``WATCH_SECONDS``. On shutdown everything turns NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio

from app.grpc.calls import Context
from app.grpc.server import Server

LIVE = "live"
WATCH_SECONDS = 1.0
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Health(aio.HealthServicer):
    def __init__(self, ready: Callable[[], bool], services: list[str]) -> None:
        super().__init__()
        self._ready = ready
        self._readiness_services = ["", "ready", *services]
        self._watcher: asyncio.Task | None = None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Context):
        await self.refresh()
        return await super().Check(request, context)

    async def refresh(self) -> None:
        status = SERVING if self._ready() else NOT_SERVING
        await self.set(LIVE, SERVING)
        for service in self._readiness_services:
            await self.set(service, status)

    async def _follow(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(WATCH_SECONDS)

    def register(self, server: Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self, server)
        self._watcher = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        """Before the server stops: NOT_SERVING everywhere, so balancers and probes let go first."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.enter_graceful_shutdown()
