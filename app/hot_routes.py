"""A shortcut past FastAPI's router for the few routes that carry the prediction traffic.

FastAPI finds a route by trying each of the app's ~35 in turn, then solves the endpoint's
dependencies and wraps it in its exception middleware. The prediction endpoints read their
request themselves and return a finished ``Response``, so for them all of that is overhead: about
a third of the event loop's time per request under load. ``HotRoutes`` tries only those routes
and calls their endpoints directly, turning an ``ApiError`` into the door's error answer exactly
as the app's handler does; every other request goes on to the router unchanged. The routes stay
ordinary FastAPI routes, so the OpenAPI document and the router still know them.

It sits inside the operational middleware (request context, keys, limits, body size), so a hot
request is identified, logged, counted, authorized and bounded like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ApiError, error_response


class HotRoutes:
    def __init__(self, app: ASGIApp, routers: Iterable[APIRouter], endpoints: Iterable[Callable]) -> None:
        self.app = app
        wanted = set(endpoints)
        routes = (route for router in routers for route in router.routes)
        self.routes = [r for r in routes if isinstance(r, APIRoute) and r.endpoint in wanted]
        if len(self.routes) != len(wanted):
            raise ValueError("every hot endpoint must be a route of one of the routers")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
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
        await response(scope, receive, send)
