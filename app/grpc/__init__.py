"""The gRPC port's doors: Open Inference Protocol v2, TF Serving, and ``grpc.health.v1``.

``open_port`` builds and starts them on the app's data plane (``app.main``'s lifespan); the
doors' modules import TF Serving's and tritonclient's generated code only from here, so a
server with ``DROPOUT_SERVE_GRPC_PORT=0`` needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from app.grpc import server
from app.grpc.health import Health
from app.settings import Settings

if TYPE_CHECKING:
    from app.dataplane import DataPlane


@dataclass
class GrpcPort:
    server: server.Server
    health: Health

    async def close(self) -> None:
        """Health turns NOT_SERVING, then calls in progress finish (``server.GRACE_SECONDS``) and the port closes."""
        await self.health.close()
        await server.stop(self.server)


async def open_port(settings: Settings, plane: DataPlane, version: str) -> GrpcPort | None:
    """The gRPC doors on ``DROPOUT_SERVE_GRPC_PORT``, serving; None when it is 0."""
    if not settings.grpc_port:
        return None
    try:
        from app.grpc import tfserving, v2
    except ModuleNotFoundError as error:  # tensorflow-serving-api goes in without its requirements (pyproject.toml)
        raise RuntimeError(
            f"the gRPC doors need the module {error.name!r}: pip install --no-deps 'tensorflow-serving-api==2.21.*' "
            "(see [tool.dropout-serve] in pyproject.toml), or switch gRPC off with DROPOUT_SERVE_GRPC_PORT=0"
        ) from error

    health = Health(plane.ready, [v2.SERVICE, tfserving.PREDICTION_SERVICE, tfserving.MODEL_SERVICE])
    doors = [partial(v2.register, plane=plane, version=version), partial(tfserving.register, plane=plane)]
    started = await server.start(settings, [*doors, health.register])
    return GrpcPort(started, health)
