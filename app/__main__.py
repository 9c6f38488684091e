"""``python -m app``: run the service with uvicorn on the configured host, port and workers.

With ``DROPOUT_SERVE_WORKERS`` above 1, uvicorn starts that many processes sharing one socket;
each loads its own copy of the models.
"""

import uvicorn

from app.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        timeout_graceful_shutdown=30,
    )
