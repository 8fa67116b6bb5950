"""`create_app(settings)`: the FastAPI application.

The lifespan migrates the database (Alembic, server/migrations) and, when enabled, starts
one embedded worker process with the same settings, and restarts it whenever it dies
(`EmbeddedWorker`). Every error
reaches the client as JSON `{"detail": ...}`: user errors from logitstore as 422, a JSON
body with NaN or Infinity as 422, anything unexpected as a bare 500 (logged, never a
traceback in the response).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logitstore import __version__, storage
from logitstore.errors import LogitStoreError
from server.db import Database
from server.deps import ReadAccessCache, refuse_non_finite_json
from server.metrics import Metrics
from server.routers import captures, corpora, store_files, stores, teams
from server.routers.store_files import StoreFileFastPath
from server.settings import Settings
from server.worker import PARENT_PID_ENV

log = logging.getLogger(__name__)


def prepare(settings: Settings, db: Database) -> None:
    """Create the local directories, remove uploads that a killed server left half-written,
    and create or upgrade the database schema."""
    local_dirs = [settings.data_dir, settings.corpora_dir]
    if settings.stores_local:
        local_dirs.append(settings.stores_dir)
    for d in local_dirs:
        d.mkdir(parents=True, exist_ok=True)
    removed = corpora.remove_stale_uploads(settings)
    if removed:
        log.info("removed %d abandoned upload(s) from %s", removed, settings.corpora_dir / ".incoming")
    db.migrate()


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
        worker = app.state.embedded_worker = EmbeddedWorker(settings) if settings.embedded_worker else None
        if worker is not None:
            worker.start()
            metrics.embedded_worker = worker.status
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
            if app.state.remote_fs is not None:
                await storage.close_filesystem(app.state.remote_fs[0])
            db.dispose()

    app = FastAPI(
        title="logitstore",
        version=__version__,
        summary="Capture a teacher's soft labels once; share and serve the stores.",
        lifespan=lifespan,
        dependencies=[Depends(refuse_non_finite_json)],
    )
    app.state.settings, app.state.db, app.state.metrics = settings, db, metrics
    app.state.embedded_worker = None
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

    @app.get("/healthz", tags=["operations"], summary="Liveness, database reachability, embedded worker",
             responses={503: {"description": "the embedded worker is dead (being restarted)"}})
    def healthz() -> JSONResponse:
        with db.sessions() as s:
            s.connection().exec_driver_sql("SELECT 1")
        # A dead embedded worker makes the server unhealthy (503) until its restart: queued jobs wait meanwhile.
        workers: dict[str, dict] = {}
        if app.state.embedded_worker is not None:
            workers["embedded"] = app.state.embedded_worker.status()
        ok = all(w["alive"] for w in workers.values())
        return JSONResponse({"ok": ok, "version": __version__, "workers": workers}, status_code=200 if ok else 503)

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


class EmbeddedWorker:
    """The embedded `logitstore-server worker` process, restarted whenever it dies (SIGKILL, out of memory).

    A thread watches the process and logs every death as an error. A worker that had run for
    `STEADY_S` is restarted at once; one that keeps dying sooner is restarted after a delay that
    doubles each time, from `BACKOFF_S` to `MAX_BACKOFF_S`, so a worker that cannot start does not spin.
    """

    WATCH_S = 0.5
    STEADY_S = 60.0
    BACKOFF_S = 1.0
    MAX_BACKOFF_S = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._started_at = 0.0
        self._quick_deaths = 0  # deaths in a row, each within STEADY_S of its start
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() never interleave
        self._watcher = threading.Thread(target=self._watch, name="embedded-worker-watch", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching, then stop the process (SIGTERM: its job goes back to the queue)."""
        with self._lock:
            self._stopping.set()
        self._watcher.join()
        stop_worker_process(self._proc)

    def status(self) -> dict:
        alive = self._proc is not None and self._proc.poll() is None
        return {"alive": alive, "pid": self._proc.pid if alive else None, "restarts": self.restarts}

    def _spawn(self) -> None:
        self._proc = start_worker_process(self.settings)
        self._started_at = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(self.WATCH_S):
            code = self._proc.poll()
            if code is None:
                continue
            lived = time.monotonic() - self._started_at
            self._quick_deaths = 0 if lived >= self.STEADY_S else self._quick_deaths + 1
            delay = 0.0
            if self._quick_deaths:
                delay = min(self.BACKOFF_S * 2 ** (self._quick_deaths - 1), self.MAX_BACKOFF_S)
            log.error("embedded worker process %d died (%s) after %.1f s; restarting it in %.0f s",
                      self._proc.pid, _exit_reason(code), lived, delay)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._spawn()
                self.restarts += 1


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def start_worker_process(settings: Settings) -> subprocess.Popen:
    """A `logitstore-server worker` child process with exactly these settings, which stops when this
    process dies (it is told this process's id: server/worker.py, `stop_with_parent`)."""
    env = {**os.environ, **settings.to_env(), PARENT_PID_ENV: str(os.getpid())}
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
