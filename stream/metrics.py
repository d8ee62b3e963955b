"""Prometheus metrics, one registry per app (so that tests can build many apps).

Requests are counted by route template, never by raw path, and by method only among
HTTP's own (anything else is `other`), so that a scan of random urls or methods cannot
blow up the number of series. Every job outcome is a series from the start, so that a
rate over the first failure sees it. Queue depth and running jobs are read from the engine
when scraped; job timings are fed by `stream.watch.JobWatch`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.jobs import EngineLoad

# From the embedded model on a CPU (a few ms) through an H100 (0.1-0.2 s) to full FLUX on a
# CPU or with sequential offload (tens of seconds).
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5, 10, 30, 60)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# How a job ends, as `fluxstream_jobs_total{outcome}` and the access log name it.
JOB_OUTCOMES = tuple("ok failed cancelled disconnected queue_timeout job_timeout shutdown".split())
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self, engine_load: Callable[[], EngineLoad]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "fluxstream_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "fluxstream_rate_limited", "requests refused with 429", registry=registry
        )
        self.cancels = Counter(
            "fluxstream_jobs_cancelled",
            "jobs stopped early by their client: it went away or cancelled the job",
            registry=registry,
        )
        self.jobs = Counter(
            "fluxstream_jobs", "jobs by how they ended", ["outcome"], registry=registry
        )
        for outcome in JOB_OUTCOMES:
            self.jobs.labels(outcome)
        queued = Gauge("fluxstream_queue_depth", "jobs waiting to run", registry=registry)
        queued.set_function(lambda: engine_load().queued)
        running = Gauge("fluxstream_jobs_running", "jobs running now", registry=registry)
        running.set_function(lambda: engine_load().running)
        self.step_seconds = Histogram(
            "fluxstream_step_seconds",
            "time per denoising step",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.first_preview_seconds = Histogram(
            "fluxstream_time_to_first_preview_seconds",
            "from accepting a request to its first preview",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "fluxstream_queue_wait_seconds",
            "time jobs waited in the queue",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.run_seconds = Histogram(
            "fluxstream_run_seconds",
            "time jobs ran on the worker",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every HTTP response by the template of the route that served it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                method = scope["method"] if scope["method"] in METHODS else "other"
                self.metrics.requests.labels(_route(scope), method, str(status)).inc()
                if status == 429:
                    self.metrics.rate_limited.inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:
        return "unmatched"
    return getattr(route, "path", "") or "/"
