"""Everything an operator needs around the routes, installed with one call from ``create_app``.

Middleware order, outermost first: request context (id, access log, metrics, so even refused
requests are logged and counted), CORS (answers browser preflights, adds its headers to every
answer including 401 and 503), API keys (only when any are configured), overload and deadline,
then the app. They wrap the app from outside (``Service.wrap``), so the prediction shortcut and
FastAPI's routes alike pass through them.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware

from app import logs, metrics
from app.auth import ApiKeyAuth
from app.context import RequestContext
from app.hot_routes import Service
from app.limits import Overload
from app.settings import Settings


def install_operations(app: Service, settings: Settings) -> None:
    """Call last in ``create_app``, after the app's own ``wrap`` calls, so these are outermost."""
    logs.configure(settings.log_format, settings.access_log)
    app.include_router(metrics.router)
    app.wrap(Overload, max_in_flight=settings.max_in_flight, timeout=settings.request_timeout)
    if keys := settings.api_key_list():
        app.wrap(ApiKeyAuth, keys=keys, metrics_require_key=settings.metrics_require_key)
    if origins := settings.cors_origin_list():
        app.wrap(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.wrap(RequestContext)
