"""One image request as the HTTP side sees it, from acceptance to its last event.

`JobWatch.events` passes a job's events through unchanged while timing them: queue wait,
step time, time to first preview and run time go to the metrics, and when the stream ends
(finished, failed, or closed early) one structured access-log line records the request.
A stream closed early is `disconnected` for a POST, whose client went away, and `cancelled`
for the jobs API, whose follower is only closed when the job is cancelled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

from pipeline.jobs import (
    EngineClosed,
    EngineError,
    Event,
    JobCancelled,
    JobHandle,
    JobTimedOut,
    Preview,
    Progress,
    QueueTimeout,
    Result,
    Started,
)
from stream.metrics import Metrics
from stream.params import ImagePlan

access_log = logging.getLogger("fluxstream.access")

OUTCOMES: dict[type[EngineError], str] = {
    JobCancelled: "cancelled",
    QueueTimeout: "queue_timeout",
    JobTimedOut: "job_timeout",
    EngineClosed: "shutdown",
}
CANCELLED = ("cancelled", "disconnected")


class JobWatch:
    def __init__(
        self, metrics: Metrics, request_id: str, plan: ImagePlan, closed: str = "disconnected"
    ) -> None:
        self._metrics = metrics
        self._closed = closed
        self._request_id = request_id
        self._plan = plan
        self._accepted_at = time.monotonic()
        self._started_at: float | None = None
        self._last_step_at: float | None = None
        self.queue_wait_s: float | None = None
        self.run_s: float | None = None
        self.first_preview_s: float | None = None
        self._server_fault = False

    def server_fault(self) -> None:
        """The job's answer failed on our side after its events (encoding, storing): the
        request counts as failed, not as a client that left."""
        self._server_fault = True

    async def events(self, handle: JobHandle) -> AsyncGenerator[Event, None]:
        outcome = self._closed
        events = handle.events()
        try:
            async for event in events:
                self._see(event, time.monotonic())
                yield event
            outcome = "ok"
        except EngineError as error:
            outcome = OUTCOMES.get(type(error), "failed")
            raise
        finally:
            # Closing this wrapper early must close the job's own stream at once: that is
            # what cancels the job when the client leaves.
            if isinstance(events, AsyncGenerator):
                await events.aclose()
            self._finish("failed" if self._server_fault else outcome)

    def _see(self, event: Event, now: float) -> None:
        metrics = self._metrics
        if isinstance(event, Started):
            self._started_at = now
            self.queue_wait_s = event.queue_wait_s
            metrics.queue_wait_seconds.observe(event.queue_wait_s)
        elif isinstance(event, Progress):
            # The first step also pays for text encoding, so it is not a step time.
            if self._last_step_at is not None:
                metrics.step_seconds.observe(now - self._last_step_at)
            self._last_step_at = now
        elif isinstance(event, Preview) and self.first_preview_s is None:
            self.first_preview_s = now - self._accepted_at
            metrics.first_preview_seconds.observe(self.first_preview_s)
        elif isinstance(event, Result) and self._started_at is not None:
            self.run_s = now - self._started_at
            metrics.run_seconds.observe(self.run_s)

    def _finish(self, outcome: str) -> None:
        self._metrics.jobs.labels(outcome).inc()
        if outcome in CANCELLED:
            self._metrics.cancels.inc()
        job = self._plan.job
        fields = {
            "request_id": self._request_id,
            "model": self._plan.model,
            "size": self._plan.size_text,
            "steps": job.num_inference_steps,
            "n": job.num_images,
            "stream": str(self._plan.stream).lower(),
            "outcome": outcome,
            "queue_wait_ms": _ms(self.queue_wait_s),
            "run_ms": _ms(self.run_s),
            "first_preview_ms": _ms(self.first_preview_s),
            "total_ms": _ms(time.monotonic() - self._accepted_at),
        }
        access_log.info(" ".join(f"{key}={value}" for key, value in fields.items()), extra=fields)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else str(round(seconds * 1000))
