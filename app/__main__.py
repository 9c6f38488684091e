"""``python -m app``: run the service with uvicorn on the configured host and port."""

import signal
import sys

import uvicorn

from app.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found
    # here; exiting with 0 tells supervisors (docker stop, systemd) the stop was clean.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level="info")
