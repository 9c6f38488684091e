"""The ASGI entry: operational middleware around a shortcut to the prediction routes, then FastAPI.

Starlette runs user middleware inside its own layers, behind FastAPI's per-request work
(telemetry check, error and body-limit layers, then trying each of the app's ~35 routes and
solving the endpoint's dependencies). The prediction endpoints read their request themselves
and return a finished ``Response``, so for them all of that is overhead, and under load the
event loop is the bottleneck. ``Service`` therefore enters every request through the middleware
every request needs (``wrap``: request context, CORS, keys, limits, body size), then
``HotRoutes``, which tries only the prediction routes (``app.routes.HOT``) and calls their
endpoints directly, turning an ``ApiError`` into the door's error answer exactly as the app's
handler does, and any other exception into the plain 500 that Starlette's ``ServerErrorMiddleware``
sends (then re-raised, so it is logged as FastAPI's are); every other request continues into FastAPI
unchanged. The routes stay ordinary FastAPI routes, so the
OpenAPI document and the router still know them.

With FastAPI's native OpenTelemetry in use (a tracer or meter provider configured when the app
starts), the shortcut is left out, so every request gets FastAPI's span.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ApiError, error_response
from app.routes import HOT


def hot_endpoints(routers: Iterable[APIRouter]) -> tuple[Callable, ...]:
    """The endpoints of the routes the route table marks hot."""
    routes = (route for router in routers for route in router.routes)
    return tuple(r.endpoint for r in routes if isinstance(r, APIRoute) and r.path_format in HOT)


class HotRoutes:
    def __init__(self, app: ASGIApp, routers: Iterable[APIRouter], endpoints: Iterable[Callable]) -> None:
        self.app = app
        wanted = set(endpoints)
        routes = (route for router in routers for route in router.routes)
        hot = [r for r in routes if isinstance(r, APIRoute) and r.endpoint in wanted]
        if len(hot) != len(wanted):
            raise ValueError("every hot endpoint must be a route of one of the routers")
        self.routes = hot
        self.fixed = {r.path: r for r in hot if not r.param_convertors}
        """Routes without path parameters, found by one lookup when no ``root_path`` is in play."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = None if scope.get("root_path") else self.fixed.get(scope["path"])
            if route is not None:
                scope.update(endpoint=route.endpoint, path_params={}, route=route)
                await self._serve(route, scope, receive, send)
                return
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    await self._serve(route, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _serve(route: APIRoute, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await route.endpoint(request=Request(scope, receive), **scope["path_params"])
        except ApiError as error:
            response = error_response(scope["path"], error.status, error.message)
        except Exception:
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise
        await response(scope, receive, send)


class Service(FastAPI):
    """FastAPI, entered through ``wrap``-ped middleware and ``hot_endpoints`` first (see the module)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hot_routers: tuple[APIRouter, ...] = ()
        self.hot_endpoints: tuple[Callable, ...] = ()
        """The prediction endpoints, routes of ``hot_routers``; empty: no shortcut."""
        self._around: list[Middleware] = []  # outermost first
        self._entry: ASGIApp | None = None

    def wrap(self, middleware_class: type, **options: Any) -> None:
        """Middleware around every request, hot or not; like ``add_middleware``, the last added is outermost."""
        if self._entry is not None:
            raise RuntimeError("middleware cannot be added once the app has started")
        self._around.insert(0, Middleware(middleware_class, **options))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._entry is None:
            self._entry = self._build_entry()
        scope["app"] = self
        await self._entry(scope, receive, send)

    def _build_entry(self) -> ASGIApp:
        app: ASGIApp = super().__call__
        if self.hot_endpoints and not _native_telemetry_on(self):
            app = HotRoutes(app, self.hot_routers, self.hot_endpoints)
        for cls, args, options in reversed(self._around):
            app = cls(app, *args, **options)
        return app


def _native_telemetry_on(app: FastAPI) -> bool:
    """Whether FastAPI (0.165+) would trace requests: it has no public query, so ask its hook if it has one."""
    telemetry = getattr(app, "_native_telemetry", None)
    return bool(telemetry is not None and telemetry.enabled())
