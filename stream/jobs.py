"""Job records and their resumable event buffers, behind a small store interface.

A job record outlives the HTTP request that created it: browsers come and go, reconnect
with `Last-Event-ID`, and read the same events again. Its state is a fold of its events
(`queued` → `progress`/`partial_image` … → `completed`, `failed` or `cancelled`), so a
store only has to keep the latest snapshot and the last few events.

A sweep trims the buffer of a finished job to its terminal event (which carries the
result): a watcher that comes later needs the outcome, not the previews, and the previews
would hold memory for the whole retention.

`MemoryJobStore` keeps everything in this process; a shared store (Redis streams, for
instance) implements the same `JobStore` protocol when the app runs as several replicas.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio

from stream.errors import error_body

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class JobEvent:
    """One event of a job; `id` counts from 1 and is the SSE `id:` of the browser stream."""

    id: int
    name: str
    data: dict[str, Any]


@dataclass
class JobRecord:
    """The snapshot of one job that `GET /v1/images/jobs/{id}` shows, and where its end is
    announced: kept with the job, so that any replica that ends it can send its webhook."""

    id: str
    created: int
    status: JobStatus = "queued"
    step: int = 0
    total_steps: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    files: tuple[str, ...] = ()
    finished_at: float | None = None
    last_event_id: int = 0
    webhook_url: str | None = None
    base_url: str = ""  # as its creator reached the server: the webhook's `events_url`

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class JobStore(Protocol):
    async def create(self, *, webhook_url: str | None = None, base_url: str = "") -> JobRecord:
        """A new queued record under a fresh, unguessable id."""
        ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The record, or None if the id is unknown or the record's retention ran out."""
        ...

    async def append(
        self, job_id: str, name: str, data: dict[str, Any], files: tuple[str, ...] = ()
    ) -> JobEvent | None:
        """Record an event, update the snapshot it implies, and wake the followers.

        `files` are result-store names to delete with the record. Events after a
        terminal one are dropped (None): a cancelled job stays cancelled."""
        ...

    def follow(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        """Buffered events with an id above `after`, then new ones as they come, until
        the job's terminal event has been yielded."""
        ...

    async def sweep(self, now: float) -> list[JobRecord]:
        """Remove and return the records that finished more than the retention ago, and
        trim the buffers of the other finished ones to their terminal event."""
        ...

    async def keep_alive(self, job_ids: Sequence[str]) -> set[str]:
        """Say that this process still runs these jobs; returns those of them that finished
        without it (cancelled through another replica, or gone), which it should stop."""
        ...

    async def fail_lost(self) -> list[JobRecord]:
        """Fail the unfinished jobs whose process stopped saying it runs them (it died);
        returns the records this call failed. A job is failed once across replicas, so
        whoever gets it here sends its webhook."""
        ...


@dataclass
class _Entry:
    record: JobRecord
    buffer: collections.deque[JobEvent]
    changed: anyio.Event = field(default_factory=anyio.Event)


class MemoryJobStore:
    """The in-process default: a dict of records, each with a bounded event deque.

    Followers wait on an `anyio.Event` that is set and replaced on every append, so a
    follower never misses an event between reading the buffer and starting to wait.
    """

    def __init__(self, *, buffer_size: int, retention_s: float) -> None:
        self.buffer_size = buffer_size
        self.retention_s = retention_s
        self._entries: dict[str, _Entry] = {}

    async def create(self, *, webhook_url: str | None = None, base_url: str = "") -> JobRecord:
        record = new_record(webhook_url, base_url)
        self._entries[record.id] = _Entry(record, collections.deque(maxlen=self.buffer_size))
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        entry = self._entries.get(job_id)
        if entry is None or self._is_expired(entry.record, time.time()):
            return None
        return entry.record

    async def append(
        self, job_id: str, name: str, data: dict[str, Any], files: tuple[str, ...] = ()
    ) -> JobEvent | None:
        entry = self._entries[job_id]
        record = entry.record
        if record.finished:
            return None
        record.last_event_id += 1
        event = JobEvent(record.last_event_id, name, data)
        entry.buffer.append(event)
        apply_event(record, event, files)
        entry.changed.set()
        entry.changed = anyio.Event()
        return event

    async def follow(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        entry = self._entries.get(job_id)
        if entry is None:
            return
        cursor = after
        while True:
            changed = entry.changed
            for event in list(entry.buffer):
                if event.id > cursor:
                    cursor = event.id
                    yield event
            if entry.record.finished and cursor >= entry.record.last_event_id:
                return
            await changed.wait()

    async def sweep(self, now: float) -> list[JobRecord]:
        gone = [e.record for e in self._entries.values() if self._is_expired(e.record, now)]
        for record in gone:
            del self._entries[record.id]
        for entry in self._entries.values():
            if entry.record.finished and len(entry.buffer) > 1:
                terminal = entry.buffer[-1]
                entry.buffer.clear()
                entry.buffer.append(terminal)
        return gone

    async def keep_alive(self, job_ids: Sequence[str]) -> set[str]:
        return set()  # only this process cancels its jobs, and it stops them itself

    async def fail_lost(self) -> list[JobRecord]:
        return []  # its jobs die with this process, and nobody is left to ask

    def _is_expired(self, record: JobRecord, now: float) -> bool:
        return record.finished_at is not None and now - record.finished_at > self.retention_s


def new_record(webhook_url: str | None, base_url: str) -> JobRecord:
    return JobRecord(
        id=f"imgjob_{secrets.token_urlsafe(18)}",
        created=int(time.time()),
        webhook_url=webhook_url,
        base_url=base_url,
    )


def apply_event(record: JobRecord, event: JobEvent, files: tuple[str, ...]) -> None:
    """The snapshot an event implies."""
    record.files += files
    if event.name == "progress":
        record.status = "in_progress"
        record.step = event.data["step"]
        record.total_steps = event.data["total_steps"]
    elif event.name in TERMINAL:
        record.status = event.name  # type: ignore[assignment]
        record.result = event.data.get("result")
        record.error = event.data.get("error")
        record.finished_at = time.time()


def failure(job_id: str, status: str, message: str, code: str | None = None) -> dict[str, Any]:
    """The data of a `failed` or `cancelled` event: the error in the OpenAI shape."""
    error = error_body(message, type="server_error", code=code)["error"]
    return {"id": job_id, "status": status, "error": error}
