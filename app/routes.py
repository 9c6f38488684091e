"""The route facts, in one table: which door a path belongs to and how each layer treats it.

Read by the API keys (``is_open``), the overload limits (``is_exempt``), the error shape
(``door_of``), the OpenAPI document (``runs_mc``, ``is_open``, ``is_exempt``), the fast path
(``HOT``) and the metrics (route templates label requests). No other module holds path strings
for these decisions. Paths are written as FastAPI's ``path_format`` (no convertors).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Door:
    name: str
    error_key: str
    """Errors answer ``{error_key: message}``."""
    invalid_status: int
    """An invalid argument: 422 natively, 400 where the protocol says so (TF Serving, Triton)."""


NATIVE = Door("native", "detail", 422)
TF_SERVING = Door("tfserving", "error", 400)
V2 = Door("v2", "error", 400)
_PREFIXES = (("/v1/", TF_SERVING), ("/v2/", V2))


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    door: Door
    hot: bool = False
    """A prediction route most traffic goes to, found ahead of the router (``app.hot_routes``)."""
    mc: bool = False
    """May run MC dropout, so answers 403 while it is switched off."""


PREDICTION_ROUTES = (
    Route("/predict", NATIVE, hot=True),
    Route("/predict/mc-dropout", NATIVE, hot=True, mc=True),
    Route("/v1/models/{name}:predict", TF_SERVING, hot=True, mc=True),
    Route("/v1/models/{name}/versions/{version}:predict", TF_SERVING, mc=True),
    Route("/v1/models/{name}/labels/{label}:predict", TF_SERVING, mc=True),
    Route("/v2/models/{name}/infer", V2, hot=True, mc=True),
    Route("/v2/models/{name}/versions/{version}/infer", V2, mc=True),
)
HOT = frozenset(route.path for route in PREDICTION_ROUTES if route.hot)
MC = frozenset(route.path for route in PREDICTION_ROUTES if route.mc)

OPEN_PREFIXES = ("/health/", "/v2/health/")
"""Health probes: open without a key (orchestrators hold none) and exempt from the overload limit."""
OPEN_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""The API documentation: it describes, it serves nothing."""
METRICS = "/metrics"


def door_of(path: str) -> Door:
    """The door a request path knocks on (its error shape), routed or not."""
    for prefix, door in _PREFIXES:
        if path.startswith(prefix):
            return door
    return V2 if path == "/v2" else NATIVE


def is_open(path: str, metrics_require_key: bool) -> bool:
    """Served without an API key."""
    if path.startswith(OPEN_PREFIXES) or path in OPEN_PATHS:
        return True
    return path == METRICS and not metrics_require_key


def is_exempt(path: str) -> bool:
    """Not counted against ``MAX_IN_FLIGHT`` nor given a deadline: an overloaded server still reports."""
    return path.startswith(OPEN_PREFIXES) or path == METRICS


def runs_mc(path: str) -> bool:
    return path in MC
