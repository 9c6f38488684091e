"""Logging: one access line per request, as text or JSON, every line tagged with its request id.

The request id lives in a context variable set by ``app.context.RequestContext``; a filter on the
handler copies it into every record, so lines written while a request is served (also from the
worker thread that runs TensorFlow, which inherits the context) carry it. The access line
replaces uvicorn's own, which knows neither the model nor the id. Headers are never logged, so
API keys cannot leak into the log.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from app.context import RequestRecord

request_id: ContextVar[str] = ContextVar("request_id", default="-")
access_log = logging.getLogger("dropout_serve.access")

_ACCESS_FIELDS = ("method", "path", "route", "status", "latency_ms", "model", "version", "instances", "samples")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message, and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        line.update({k: getattr(record, k) for k in _ACCESS_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")


def configure(fmt: Literal["text", "json"], access_lines: bool = True) -> None:
    """Route our loggers and uvicorn's through one handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    for name in ("dropout_serve", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # our access line replaces it
    access_log.disabled = not access_lines


def access(record: RequestRecord) -> None:
    if access_log.disabled:  # DROPOUT_SERVE_ACCESS_LOG=false: skip building the line
        return
    fields = {
        "method": record.method,
        "path": record.path,
        "route": record.route,
        "status": record.status,
        "latency_ms": round(record.seconds * 1000, 3),
        "model": record.model or None,
        "version": record.version,
        "instances": record.instances,
        "samples": record.samples,
    }
    served = " ".join(f"{k}={fields[k]}" for k in ("model", "version", "instances", "samples") if fields[k] is not None)
    message = f"{record.method} {record.path} {record.status} {fields['latency_ms']}ms {served}".rstrip()
    access_log.info(message, extra=fields)
