"""The application: ``create_app(settings)``, and ``app`` for ``uvicorn app.main:app``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.api import router
from app.errors import BodySizeLimit, install_error_handlers
from app.operations import install_operations
from app.registry import Registry
from app.settings import Settings

log = logging.getLogger("dropout_serve")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.registry = await run_in_threadpool(
            Registry.load, settings.model_dir, settings.default_model, settings.load_all_versions
        )
        if not len(app.state.registry):
            log.warning("no loadable model in %s; /health/ready answers 503", settings.model_dir.resolve())
        yield

    app = FastAPI(
        title="dropout-serve",
        summary="Keras models served with Monte-Carlo dropout uncertainty.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    install_operations(app, settings)
    return app


app = create_app()
