"""`create_app`: the one way the server is assembled, by the CLI and by the tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from tunedesk import __version__
from tunedesk.serve.access_log import AccessLogMiddleware
from tunedesk.serve.admission import Admission
from tunedesk.serve.auth import KeyStore
from tunedesk.serve.body_limit import BodySizeLimitMiddleware
from tunedesk.serve.deps import AppState
from tunedesk.serve.engines.base import Engine
from tunedesk.serve.errors import install_error_handlers
from tunedesk.serve.heap import freeze_startup_heap
from tunedesk.serve.routes import router
from tunedesk.serve.service import OpenAIService
from tunedesk.serve.settings import ServeSettings
from tunedesk.serve.widget import router as widget_router

log = logging.getLogger("tunedesk.serve")


def load_keys(settings: ServeSettings) -> KeyStore:
    return KeyStore.load([k.get_secret_value() for k in settings.api_keys], settings.api_key_file)


def create_app(settings: ServeSettings, engine: Engine, keys: KeyStore | None = None) -> FastAPI:
    keys = keys if keys is not None else load_keys(settings)
    if keys.open:
        log.warning(
            "no API keys configured: the server accepts every request "
            "(set --api-key-file or TUNEDESK_API_KEYS)"
        )
    else:
        log.info("API keys: %d configured", len(keys))
    admission = Admission(settings.max_running, settings.max_queued, settings.retry_after_s)
    metrics = engine.metrics
    metrics.bind_admission(admission)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        freeze_startup_heap()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(
        title="tunedesk",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.tunedesk = AppState(
        settings=settings,
        engine=engine,
        keys=keys,
        admission=admission,
        metrics=metrics,
        service=OpenAIService(engine, admission),
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(widget_router)
    if settings.finetune:
        from tunedesk.serve.finetune import install_finetuning

        install_finetuning(app)
    # Added innermost first: the access log wraps everything, CORS answers preflights before
    # auth or size checks run, and the size limit guards the body the routes read.
    uploads = {"/v1/files": settings.max_upload_bytes} if settings.finetune else {}
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, max_bytes_by_path=uploads
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(AccessLogMiddleware, metrics=metrics, log_content=settings.log_content)
    return app
