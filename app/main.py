"""The application: ``create_app(settings)``, and ``app`` for ``uvicorn app.main:app``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import tensorflow as tf
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app import memory, openapi
from app.dataplane import DataPlane
from app.errors import BodySizeLimit, install_error_handlers
from app.hot_routes import Service, hot_endpoints
from app.operations import install_operations
from app.protocols import native, tfserving, v2
from app.registry import start_registry
from app.runner import Runtime
from app.settings import Settings

log = logging.getLogger("dropout_serve")


def _limit_tf_threads(threads: int) -> None:
    if threads == 0:  # TensorFlow's own choice
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already started in this process (tests that share it)
        log.warning("TensorFlow is already initialized; DROPOUT_SERVE_TF_THREADS=%d not applied", threads)


def create_app(settings: Settings | None = None) -> Service:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _limit_tf_threads(settings.tf_threads)
        memory.relax_young_collections()
        runtime = Runtime(settings)
        registry = await run_in_threadpool(start_registry, settings, runtime)
        app.state.dataplane = DataPlane(settings, registry)
        try:
            yield
        finally:
            registry.stop()
            runtime.close()

    app = Service(
        title="dropout-serve",
        summary="Keras models served with Monte-Carlo dropout uncertainty.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.dataplane = None
    """The one data plane every door calls (``app.dataplane``), created with the registry at start-up."""
    app.include_router(native.router)
    app.include_router(tfserving.router)
    app.include_router(v2.router)
    install_error_handlers(app)
    app.hot_routers = (native.router, tfserving.router, v2.router)
    app.hot_endpoints = hot_endpoints(app.hot_routers)
    app.wrap(BodySizeLimit, limit=settings.max_body_bytes)
    install_operations(app, settings)
    openapi.install(app, settings)
    return app


app = create_app()
