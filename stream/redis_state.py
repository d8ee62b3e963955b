"""Shared state for replicas on several machines: job records, event buffers, url results.

The same `JobStore` and `ResultStore` interfaces as the in-process defaults, on Redis:
- a job's snapshot is one JSON string; its events are a Redis stream whose entry ids are
  `0-<event id>`, so `Last-Event-ID: n` resumes with `XREAD` from `0-n` on any replica, and
  `MAXLEN` keeps the buffer bounded;
- appends are optimistic transactions (`WATCH` the snapshot), because the replica running a
  job and a replica cancelling it may write at the same moment; a terminal event wins and
  later appends return None, which tells the running replica to stop its job;
- finished jobs sit in a sorted set by finish time, so a sweep on any replica finds the
  ones whose retention ran out and hands their result files to be deleted, and in a set
  of those whose streams the next sweep trims to their terminal event;
- the replica running a job renews a lease key on it (`keep_alive`) and learns then of
  jobs cancelled elsewhere, even queued ones that send no events; unfinished jobs are in a
  set, which every replica scans as often (`fail_lost`) for jobs whose lease ran out (their
  replica died, or stopped without recording an outcome): the one whose append fails such
  a job sends its webhook, and its watchers get a `failed` event instead of waiting;
- result files are plain keys with a TTL of `url_ttl_s`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import WatchError

from stream.jobs import TERMINAL, JobEvent, JobRecord, apply_event, failure, new_record
from stream.store import StoredImage, is_valid_name, media_type_of, new_name

# Unfinished jobs keep their keys this long at most, so a crashed replica leaves no litter.
UNFINISHED_TTL_S = 24 * 3600
BLOCK_MS = 1000
LOST = "the server replica running this job stopped before it finished; submit it again"


class RedisJobStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        buffer_size: int,
        retention_s: float,
        lease_s: float,
        prefix: str,
    ) -> None:
        self.client = client
        self.buffer_size = buffer_size
        self.retention_s = retention_s
        self.lease_ms = max(1, int(lease_s * 1000))
        self.prefix = prefix

    def _record_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def _lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lease"

    @property
    def _finished_key(self) -> str:
        return f"{self.prefix}:jobs:finished"

    @property
    def _untrimmed_key(self) -> str:
        return f"{self.prefix}:jobs:untrimmed"

    @property
    def _unfinished_key(self) -> str:
        return f"{self.prefix}:jobs:unfinished"

    async def create(self, *, webhook_url: str | None = None, base_url: str = "") -> JobRecord:
        record = new_record(webhook_url, base_url)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._record_key(record.id), _dump(record), ex=UNFINISHED_TTL_S)
            pipe.set(self._lease_key(record.id), 1, px=self.lease_ms)
            pipe.sadd(self._unfinished_key, record.id)
            await pipe.execute()
        return record

    async def keep_alive(self, job_ids: Sequence[str]) -> set[str]:
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.set(self._lease_key(job_id), 1, px=self.lease_ms)
                pipe.get(self._record_key(job_id))
            replies = await pipe.execute()
        records = replies[1::2]
        return {
            job_id
            for job_id, raw in zip(job_ids, records, strict=True)
            if raw is None or _load(raw).finished
        }

    async def fail_lost(self) -> list[JobRecord]:
        job_ids = [_text(raw) for raw in await self.client.smembers(self._unfinished_key)]
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self._lease_key(job_id))
                pipe.exists(self._record_key(job_id))
            replies = await pipe.execute()
        failed = []
        for job_id, leased, recorded in zip(job_ids, replies[::2], replies[1::2], strict=True):
            if not recorded:  # expired unfinished, with no replica left to scan meanwhile
                await self.client.srem(self._unfinished_key, job_id)
            # Refused if the job finished meanwhile or another replica failed it first.
            elif not leased and await self.append(job_id, "failed", _lost(job_id)) is not None:
                record = await self.get(job_id)
                if record is not None:
                    failed.append(record)
        return failed

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.client.get(self._record_key(job_id))
        if raw is None:
            return None
        record = _load(raw)
        if record.finished_at is not None and time.time() - record.finished_at > self.retention_s:
            return None
        return record

    async def append(
        self, job_id: str, name: str, data: dict[str, Any], files: tuple[str, ...] = ()
    ) -> JobEvent | None:
        key = self._record_key(job_id)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    record = _load(raw)
                    if record.finished:
                        return None
                    record.last_event_id += 1
                    event = JobEvent(record.last_event_id, name, data)
                    apply_event(record, event, files)
                    pipe.multi()
                    self._queue_writes(pipe, record, event)
                    await pipe.execute()
                    return event
                except WatchError:
                    continue

    def _queue_writes(self, pipe: Any, record: JobRecord, event: JobEvent) -> None:
        events_key = self._events_key(record.id)
        pipe.xadd(
            events_key,
            {"name": event.name, "data": json.dumps(event.data)},
            id=f"0-{event.id}",
            maxlen=self.buffer_size,
            approximate=False,
        )
        # Records outlive their retention by a little, so that a sweep can still read
        # their file names; `get` applies the retention itself.
        ttl = int(self.retention_s + 3600) if record.finished else UNFINISHED_TTL_S
        pipe.set(self._record_key(record.id), _dump(record), ex=ttl)
        pipe.expire(events_key, ttl)
        if record.finished_at is not None:
            pipe.zadd(self._finished_key, {record.id: record.finished_at})
            pipe.sadd(self._untrimmed_key, record.id)
            pipe.srem(self._unfinished_key, record.id)

    async def follow(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        cursor = f"0-{after}"
        events_key = self._events_key(job_id)
        while True:
            reply = await self.client.xread({events_key: cursor}, count=100, block=BLOCK_MS)
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    cursor = _text(entry_id)
                    name = _text(fields[b"name"])
                    yield JobEvent(int(cursor.split("-")[1]), name, json.loads(fields[b"data"]))
                    if name in TERMINAL:
                        return
            # A job whose replica died is failed by `fail_lost`; the next read yields that.
            if not reply and await self.get(job_id) is None:
                return

    async def sweep(self, now: float) -> list[JobRecord]:
        await self._trim_finished()
        expired = await self.client.zrangebyscore(self._finished_key, 0, now - self.retention_s)
        gone: list[JobRecord] = []
        for raw_id in expired:
            job_id = _text(raw_id)
            # Only the replica whose ZREM succeeds drops the job, so files go exactly once.
            if not await self.client.zrem(self._finished_key, job_id):
                continue
            raw = await self.client.get(self._record_key(job_id))
            await self.client.delete(self._record_key(job_id), self._events_key(job_id))
            if raw is not None:
                gone.append(_load(raw))
        return gone

    async def _trim_finished(self) -> None:
        """Trim the streams of the jobs finished since the last sweep to their terminal
        event (trimming twice, from two replicas, does no harm)."""
        finished = await self.client.smembers(self._untrimmed_key)
        if not finished:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for raw_id in finished:
                pipe.xtrim(self._events_key(_text(raw_id)), maxlen=1, approximate=False)
            pipe.srem(self._untrimmed_key, *finished)
            await pipe.execute()


class RedisResultStore:
    """Url results as keys with a TTL: any replica serves what any other stored."""

    def __init__(self, client: redis.Redis, *, ttl_s: float, prefix: str) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix

    def _key(self, name: str) -> str:
        return f"{self.prefix}:file:{name}"

    async def put(self, data: bytes, output_format: str) -> str:
        name = new_name(output_format)
        await self.client.set(self._key(name), data, ex=max(1, int(self.ttl_s)))
        return name

    async def read(self, name: str) -> StoredImage | None:
        if not is_valid_name(name):
            return None
        data = await self.client.get(self._key(name))
        return None if data is None else StoredImage(data=data, media_type=media_type_of(name))

    async def delete(self, name: str) -> None:
        if is_valid_name(name):
            await self.client.delete(self._key(name))

    async def sweep(self) -> int:
        return 0  # Redis expires the keys itself


def _lost(job_id: str) -> dict[str, Any]:
    return failure(job_id, "failed", LOST, "replica_failed")


def _dump(record: JobRecord) -> str:
    return json.dumps(dataclasses.asdict(record))


def _load(raw: bytes | str) -> JobRecord:
    fields = json.loads(raw)
    fields["files"] = tuple(fields["files"])
    return JobRecord(**fields)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
