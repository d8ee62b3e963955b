"""Jobs you can watch from a browser: submit now, read the events later, resume at will.

The OpenAI POST streams tie a job to its HTTP response: when the client leaves, the job is
cancelled. A browser's `EventSource` can only GET and reconnects whenever it likes, so here
the job is decoupled from its watchers. A background task owned by the app consumes the
engine's events and appends them to the job's record in a `JobStore`; any number of
watchers read the record's bounded buffer, from the start or after a `Last-Event-ID`.

Who cancels whom:
- a watcher disconnects: only its SSE response ends; the job runs on;
- `DELETE /v1/images/jobs/{id}`: the record turns `cancelled` at once, the follower task's
  cancel scope is cancelled, and the engine handle is cancelled (queued: dropped;
  running: stopped at its next step); through another replica, the running one learns it
  at its next append or lease renewal, whichever comes first;
- shutdown: the task group of `running()` is cancelled, which cancels every follower and
  through it every engine job, before the engine itself is closed;
- the engine fails the job: the record turns `failed` with a message safe for users;
- the store fails (Redis gone): that job's follower logs it and ends, and nothing else
  stops (its task group is shared by every job, and the engine closes when it fails);
- this process dies: it stops renewing its jobs' leases (`keep_alive`), and the next
  lease scan of any other replica (`fail_lost`) fails them.
A webhook, when asked for, is sent after the job's terminal event, whatever it was, by the
process that recorded that event: the follower, the replica a `DELETE` reached, or the one
whose scan failed the job of a dead replica. A store records one terminal event per job,
so the webhook goes out once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from pipeline.jobs import (
    ContentFiltered,
    EngineError,
    JobCancelled,
    JobHandle,
    JobRejected,
    Preview,
    Progress,
    Result,
)
from stream import sse, webhooks
from stream.errors import NotFound, ServiceUnavailable
from stream.jobs import JobEvent, JobRecord, JobStore, failure
from stream.params import ImagePlan
from stream.serving import ImageService, refusal
from stream.shutdown import InFlight
from stream.watch import JobWatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Following:
    handle: JobHandle
    scope: anyio.CancelScope


class JobService:
    def __init__(self, images: ImageService, store: JobStore, in_flight: InFlight) -> None:
        self.images = images
        self.settings = images.settings
        self.store = store
        self._in_flight = in_flight
        self._group: anyio.abc.TaskGroup | None = None
        self._following: dict[str, _Following] = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Own the follower tasks for the app's lifetime; leaving cancels them all."""
        async with anyio.create_task_group() as group:
            self._group = group
            group.start_soon(self._keep_alive_forever)
            try:
                yield
            finally:
                self._group = None
                group.cancel_scope.cancel()

    async def submit(
        self,
        plan: ImagePlan,
        *,
        kind: str,
        partial_images: int,
        base_url: str,
        webhook_url: str | None = None,
    ) -> JobRecord:
        """Queue any planned request as a job (429/503 before anything is recorded).

        `kind` is the event prefix of its partial images (`image_generation` or
        `image_edit`); `partial_images` previews are made whatever `plan.stream` says,
        since the job's events, not its response, carry them."""
        if self._group is None:
            raise ServiceUnavailable("the server is not accepting jobs")
        job = dataclasses.replace(plan.job, partial_images=partial_images)
        plan = dataclasses.replace(plan, job=job, partial_images=partial_images)
        handle = self.images.submit(plan)
        try:
            record = await self.store.create(webhook_url=webhook_url, base_url=base_url)
            await self.store.append(record.id, "queued", {"id": record.id, "status": "queued"})
        except BaseException:
            handle.cancel()  # a job nobody can watch or fetch must not hold the engine
            raise
        following = _Following(handle, anyio.CancelScope())
        self._following[record.id] = following
        self._group.start_soon(
            self._follow, record.id, following, plan, kind, base_url, webhook_url
        )
        return record

    async def get(self, job_id: str) -> JobRecord:
        record = await self.store.get(job_id)
        if record is None:
            raise NotFound("this job does not exist or has expired", code="job_not_found")
        return record

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job that has not finished; a finished job is left as it is."""
        record = await self.get(job_id)
        if record.finished:
            return record
        # The terminal event in the store is what cancels: the replica running the job
        # (this one or another, with a shared store) sees its next append refused.
        await self._end(job_id, "cancelled", _cancelled(job_id), record.webhook_url)
        self._stop(job_id)
        return await self.get(job_id)

    def _stop(self, job_id: str) -> None:
        """Stop following a job of this process whose record is final, and its engine work."""
        following = self._following.get(job_id)
        if following is not None:
            following.handle.cancel()
            following.scope.cancel()

    def snapshot(self, record: JobRecord, base_url: str) -> dict[str, Any]:
        """What `GET /v1/images/jobs/{id}` answers, the 202 of submit, and the webhook body."""
        progress = None
        if record.total_steps is not None:
            progress = {"step": record.step, "total_steps": record.total_steps}
        return {
            "id": record.id,
            "object": "image.job",
            "status": record.status,
            "created": record.created,
            "events_url": f"{base_url.rstrip('/')}/v1/images/jobs/{record.id}/events",
            "progress": progress,
            "result": record.result,
            "error": record.error,
        }

    async def event_frames(self, job_id: str, after: int) -> AsyncIterator[sse.Frame]:
        """The job's events after `after` as SSE frames with ids; 404 before streaming."""
        await self.get(job_id)
        return self._frames(job_id, after)

    async def _frames(self, job_id: str, after: int) -> AsyncIterator[sse.Frame]:
        async for event in self.store.follow(job_id, after):
            yield sse.job_frame(event.id, event.name, event.data)

    async def sweep(self) -> int:
        """Drop jobs whose retention ran out, with their result files."""
        gone = await self.store.sweep(time.time())
        names = [name for record in gone for name in record.files]
        for name in names:
            await self.images.store.delete(name)
        return len(gone)

    async def _keep_alive_forever(self) -> None:
        """Renew the leases of the jobs this process runs, several times per lease, and stop
        those finished elsewhere: a queued job cancelled through another replica sends no
        event whose refused append would tell. Then fail the jobs of replicas that died."""
        while True:
            try:
                finished = await self.store.keep_alive(list(self._following))
                lost = await self.store.fail_lost()
            except Exception as error:
                logger.warning("job leases were not renewed or checked: %s", error)
                finished, lost = set(), []
            for job_id in finished:
                self._stop(job_id)
            for record in lost:
                logger.warning("job %s failed: its replica stopped renewing it", record.id)
                if record.webhook_url is not None:
                    await self._send_webhook(record.id, record.webhook_url)
            await anyio.sleep(self.settings.job_lease_s / 4)

    async def _end(
        self,
        job_id: str,
        name: str,
        data: dict[str, Any],
        webhook_url: str | None,
        files: tuple[str, ...] = (),
    ) -> None:
        """Record the job's terminal event, and if this append is the one that recorded it
        (a store refuses events after a terminal one), send the job's webhook."""
        if await self.store.append(job_id, name, data, files) is not None and webhook_url:
            await self._send_webhook(job_id, webhook_url)

    async def _send_webhook(self, job_id: str, url: str) -> None:
        """Deliver the finished job to `url` in a task of its own: retries must hold up
        neither a `DELETE` answer nor the lease scan."""
        if self._group is None:
            logger.warning("webhook for job %s was not delivered: the server stopped", job_id)
            return
        await self._group.start(self._deliver_webhook, job_id, url)

    async def _deliver_webhook(
        self,
        job_id: str,
        url: str,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Counted in flight before `_send_webhook` returns, so that a drain that starts as
        the job ends waits for it. Nothing may escape: this task shares its group."""
        async with self._in_flight.track():
            task_status.started()
            try:
                record = await self.store.get(job_id)
                if record is None:
                    return
                payload = self.snapshot(record, record.base_url)
                if not await webhooks.deliver(url, job_id, payload, self.settings):
                    logger.warning("webhook for job %s was not delivered", job_id)
            except Exception:
                logger.exception("webhook for job %s was not delivered", job_id)

    async def _follow(
        self,
        job_id: str,
        following: _Following,
        plan: ImagePlan,
        kind: str,
        base_url: str,
        webhook_url: str | None,
    ) -> None:
        """Follow one job to its end. Nothing may escape: this task shares its group with
        every other job's, and the lifespan closes the engine when that group fails, so a
        store outage (Redis gone) must fail this job's record only, not the replica."""
        try:
            async with self._in_flight.track():
                try:
                    with following.scope:
                        await self._consume(
                            job_id, following.handle, plan, kind, base_url, webhook_url
                        )
                finally:
                    del self._following[job_id]
        except Exception:
            logger.exception("job %s was not followed to its end", job_id)

    async def _consume(
        self,
        job_id: str,
        handle: JobHandle,
        plan: ImagePlan,
        kind: str,
        base_url: str,
        webhook_url: str | None,
    ) -> None:
        append = self.store.append
        events = JobWatch(self.images.metrics, job_id, plan, closed="cancelled").events(handle)
        try:
            async for event in events:
                recorded: JobEvent | None = None
                if isinstance(event, Progress):
                    recorded = await append(
                        job_id, "progress", {"step": event.step, "total_steps": event.total_steps}
                    )
                elif isinstance(event, Preview):
                    recorded = await append(
                        job_id,
                        "partial_image",
                        await self.images.partial_payload(event, plan, kind),
                    )
                if isinstance(event, Progress | Preview) and recorded is None:
                    handle.cancel()  # finished elsewhere: cancelled through another replica
                    return
                if isinstance(event, Result):
                    files: list[str] = []
                    body = await self.images.result_body(event, plan, base_url, files)
                    data = {"id": job_id, "status": "completed", "result": body}
                    await self._end(job_id, "completed", data, webhook_url, tuple(files))
        except JobCancelled:
            await self._end(job_id, "cancelled", _cancelled(job_id), webhook_url)
        except (ContentFiltered, JobRejected) as refused:
            error = refusal(refused, plan).body()["error"]
            failed = {"id": job_id, "status": "failed", "error": error}
            await self._end(job_id, "failed", failed, webhook_url)
        except EngineError as error:
            message = str(error) or "the image could not be generated"
            await self._end(job_id, "failed", failure(job_id, "failed", message), webhook_url)
        except Exception:
            logger.exception("job %s failed while its results were prepared", job_id)
            internal = failure(job_id, "failed", "the server hit an internal error")
            await self._end(job_id, "failed", internal, webhook_url)


def _cancelled(job_id: str) -> dict[str, Any]:
    return failure(job_id, "cancelled", "the job was cancelled", "cancelled")
