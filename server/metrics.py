"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide).

Job counts and capture totals are read from the database at scrape time, so they are
right whatever worker process (or machine) did the work; request latency is measured in
this process by a middleware; the embedded worker's liveness and restarts come from the
process that runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select

from server.db import JOB_STATES, Database, Job


class _JobCollector:
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        with self.db.sessions() as s:
            counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            tokens = s.scalar(select(func.coalesce(func.sum(Job.tokens_done), 0)))
            rate = s.scalar(select(func.coalesce(func.sum(Job.tokens_per_s), 0.0)).where(Job.state == "running"))
        jobs = GaugeMetricFamily("logitstore_jobs", "capture jobs by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield CounterMetricFamily("logitstore_tokens_captured", "tokens committed by capture jobs", value=tokens)
        yield GaugeMetricFamily("logitstore_capture_tokens_per_second", "summed rate of running captures", value=rate)


class _EmbeddedWorkerCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        if self.metrics.embedded_worker is None:  # this process runs no worker
            return
        status = self.metrics.embedded_worker()
        yield GaugeMetricFamily("logitstore_embedded_worker_alive", "1 while the embedded worker process runs",
                                value=int(status["alive"]))
        yield CounterMetricFamily("logitstore_embedded_worker_restarts", "restarts of the embedded worker after "
                                  "it died", value=status["restarts"])


class Metrics:
    def __init__(self, db: Database) -> None:
        # The embedded worker's status ({"alive", "restarts", ...}), set while this process runs one.
        self.embedded_worker: Callable[[], dict] | None = None
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "logitstore_request_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_JobCollector(db))
        self.registry.register(_EmbeddedWorkerCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)
