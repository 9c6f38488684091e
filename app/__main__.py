"""``python -m app``: run the service with uvicorn on the configured host and port."""

import uvicorn

from app.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level="info")
