"""``python -m app``: run the service with uvicorn on the configured host, port and workers.

With ``DROPOUT_SERVE_WORKERS`` above 1, uvicorn starts that many processes sharing one socket;
each loads its own copy of the models, and their metrics meet in a fresh multiprocess directory.
"""

import signal
import sys

import uvicorn

from app.metrics import prepare_multiprocess
from app.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    prepare_multiprocess(settings.workers)  # before the workers start: they read it when they import
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found
    # here; exiting with 0 tells supervisors (docker stop, systemd) the stop was clean.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        timeout_graceful_shutdown=30,
        # uvicorn's 5 s default races clients and proxies that keep idle connections longer
        # (httpx 5 s, AWS ALB 60 s): a request sent as the server closes the connection is lost.
        timeout_keep_alive=settings.keep_alive_seconds,
    )
