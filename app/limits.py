"""Limits that keep the service's latency bounded: requests in progress, and each one's deadline.

``Overload`` bounds the requests in progress (``MAX_IN_FLIGHT``): one more is answered at once with
503 and ``Retry-After`` instead of queueing without bound, so a client or balancer can go elsewhere.
It also gives every request a deadline (``REQUEST_TIMEOUT``): past it the client gets 504 right
away and its slot is freed. A request still waiting (for its body, or for a batch) simply stops;
TensorFlow work already running in a thread cannot be interrupted, so it finishes in the
background and its batch-mates still get their answers. The deadline is a timer that cancels
the request's own task unless its response has started (``RequestContext`` records the status
line): a response under way is let finish.
Health probes and ``/metrics`` are exempt (``app.routes``), so an overloaded server still reports
that it is alive. The limits on what one request may ask (instances, T, returned values) are the
data plane's (``app.dataplane``).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from app.context import reply, response_started
from app.routes import is_exempt

RETRY_AFTER_SECONDS = 1


class Overload:
    def __init__(self, app: ASGIApp, max_in_flight: int, timeout: float) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            message = (
                f"the server is at its limit of {self.max_in_flight} requests in progress "
                f"(DROPOUT_SERVE_MAX_IN_FLIGHT); retry after {RETRY_AFTER_SECONDS} s"
            )
            await reply(scope, send, 503, message, {"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
        self.in_flight += 1
        deadline = _Deadline(asyncio.current_task(), scope, self.timeout) if self.timeout else None
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if deadline is None or not deadline.expired or deadline.task.uncancel() > 0:
                raise  # not (only) ours: the server is shutting the request down
            limit = f"{self.timeout:g} s (DROPOUT_SERVE_REQUEST_TIMEOUT)"
            await reply(scope, send, 504, f"the request took longer than {limit} and was abandoned")
        finally:
            if deadline is not None:
                deadline.disarm()
            self.in_flight -= 1


class _Deadline:
    """Cancels ``task`` after ``seconds`` unless disarmed first or its response has started (then it is
    let finish): one timer, cheaper than ``asyncio.timeout`` and than watching every message sent."""

    __slots__ = ("_scope", "_timer", "expired", "task")

    def __init__(self, task: asyncio.Task, scope: Scope, seconds: float) -> None:
        self.task = task
        self.expired = False
        self._scope = scope
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        if not response_started(self._scope):
            self.expired = True
            self.task.cancel()

    def disarm(self) -> None:
        self._timer.cancel()
