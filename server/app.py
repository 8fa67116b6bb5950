"""`create_app(settings)`: the FastAPI application.

The lifespan creates the tables and, when enabled, starts one embedded worker process
with the same settings. Every error reaches the client as JSON `{"detail": ...}`: user
errors from logitstore as 422, anything unexpected as a bare 500 (logged, never a
traceback in the response).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logitstore import __version__, storage
from logitstore.errors import LogitStoreError
from server.db import Database
from server.deps import ReadAccessCache
from server.metrics import Metrics
from server.routers import captures, corpora, store_files, stores, teams
from server.routers.store_files import StoreFileFastPath
from server.settings import Settings

log = logging.getLogger(__name__)


def prepare(settings: Settings, db: Database) -> None:
    """Create the local directories and the database tables that are missing."""
    local_dirs = [settings.data_dir, settings.corpora_dir]
    if settings.stores_local:
        local_dirs.append(settings.stores_dir)
    for d in local_dirs:
        d.mkdir(parents=True, exist_ok=True)
    db.create_tables()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    db = Database(settings.db_url)
    metrics = Metrics(db)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare(settings, db)
        # Store files under an s3:// root are read through one asynchronous filesystem, made in
        # this event loop (the one that serves requests) and closed with it.
        app.state.remote_fs = None
        if not settings.stores_local:
            app.state.remote_fs = storage.async_filesystem(settings.storage_root, settings.storage_options)
        worker = start_worker_process(settings) if settings.embedded_worker else None
        try:
            yield
        finally:
            if worker is not None:
                stop_worker_process(worker)
            if app.state.remote_fs is not None:
                await storage.close_filesystem(app.state.remote_fs[0])
            db.dispose()

    app = FastAPI(
        title="logitstore",
        version=__version__,
        summary="Capture a teacher's soft labels once; share and serve the stores.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.db, app.state.metrics = settings, db, metrics
    app.state.read_cache = ReadAccessCache(settings.read_cache_s)
    for module in (teams, corpora, captures, stores, store_files):
        app.include_router(module.router)

    # The last added is the outermost: latency is measured for every request, fast-path reads included.
    app.add_middleware(StoreFileFastPath, settings=settings, cache=app.state.read_cache)
    app.add_middleware(LatencyMiddleware, metrics=metrics)

    @app.exception_handler(LogitStoreError)
    async def _user_error(request: Request, exc: LogitStoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/healthz", tags=["operations"], summary="Liveness and database reachability")
    def healthz() -> dict:
        with db.sessions() as s:
            s.connection().exec_driver_sql("SELECT 1")
        return {"ok": True, "version": __version__}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class LatencyMiddleware:
    """Request latency by method, route template and status; plain ASGI, so that the many small
    range reads of remote readers do not pay for a BaseHTTPMiddleware's extra task and queue."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_seconds.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - started
            )


def start_worker_process(settings: Settings) -> subprocess.Popen:
    """A `logitstore-server worker` child process with exactly these settings."""
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env)
    log.info("started embedded worker process %d", proc.pid)
    return proc


def stop_worker_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (the worker hands its job back to the queue), then SIGKILL if it does not exit."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
