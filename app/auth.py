"""Optional API keys: ``DROPOUT_SERVE_API_KEYS`` set means every route needs one, except a few open ones.

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` and is compared with every
configured key in constant time (``hmac.compare_digest``, no early exit), so response time does not
tell how much of a guess was right. A missing or wrong key gets 401 with ``WWW-Authenticate``.
Open without a key: health probes (orchestrators do not hold keys), the API documentation (it
describes, it serves nothing), CORS preflights (browsers send them without credentials; the CORS
middleware answers them before this one), and ``/metrics`` unless ``METRICS_REQUIRE_KEY``.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from app.context import reply
from app.routes import is_open

_CHALLENGE = 'Bearer realm="dropout-serve"'


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key a request carries, from ``Authorization: Bearer`` or ``X-API-Key``, if any."""
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key") or None


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: list[str], metrics_require_key: bool) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.metrics_require_key = metrics_require_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or is_open(scope["path"], self.metrics_require_key):
            await self.app(scope, receive, send)
            return
        presented = presented_key(dict(scope["headers"]))
        if presented is None:
            message = "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            await reply(scope, send, 401, message, {"WWW-Authenticate": _CHALLENGE})
            return
        if not key_matches(presented, self.keys):
            challenge = f'{_CHALLENGE}, error="invalid_token"'
            await reply(scope, send, 401, "the API key is not valid", {"WWW-Authenticate": challenge})
            return
        await self.app(scope, receive, send)
