"""The `JobStore` contract, run against the in-process store and the Redis one alike."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from stream.jobs import JobEvent, JobRecord, JobStore, MemoryJobStore
from tests.redis_server import redis_server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[JobStore]:
    if request.param == "memory":
        yield MemoryJobStore(buffer_size=3, retention_s=60)
        return
    import redis.asyncio as redis

    from stream.redis_state import RedisJobStore

    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    prefix = f"test-{secrets.token_hex(4)}"
    yield RedisJobStore(client, buffer_size=3, retention_s=60, lease_s=60, prefix=prefix)
    await client.aclose()


async def collect(store: JobStore, job_id: str, after: int) -> list[JobEvent]:
    return [event async for event in store.follow(job_id, after)]


async def test_snapshot_follows_events_and_a_terminal_state_is_final(store: JobStore) -> None:
    record = await store.create()
    await store.append(record.id, "progress", {"step": 2, "total_steps": 8})
    snapshot = await store.get(record.id)
    assert snapshot is not None and (snapshot.status, snapshot.step) == ("in_progress", 2)
    await store.append(record.id, "cancelled", {"error": {"message": "cancelled"}})
    assert await store.append(record.id, "completed", {"result": {}}, ("a.png",)) is None
    final = await store.get(record.id)
    assert final is not None and final.status == "cancelled" and final.files == ()


async def test_resume_after_an_event_id_yields_only_later_events(store: JobStore) -> None:
    record = await store.create()
    for step in (1, 2):
        await store.append(record.id, "progress", {"step": step, "total_steps": 3})
    await store.append(record.id, "completed", {"result": {"data": []}})
    assert [(e.id, e.name) for e in await collect(store, record.id, after=1)] == [
        (2, "progress"),
        (3, "completed"),
    ]


async def test_buffer_is_bounded_and_a_stale_resume_starts_at_the_oldest_kept(
    store: JobStore,
) -> None:
    record = await store.create()
    for step in range(1, 6):
        await store.append(record.id, "progress", {"step": step, "total_steps": 6})
    await store.append(record.id, "completed", {"result": {}})
    assert [e.id for e in await collect(store, record.id, after=0)] == [4, 5, 6]


async def test_follower_receives_events_as_they_are_appended(store: JobStore) -> None:
    record = await store.create()
    seen: list[str] = []

    async def follow() -> None:
        async for event in store.follow(record.id, after=0):
            seen.append(event.name)

    async with anyio.create_task_group() as group:
        group.start_soon(follow)
        await anyio.sleep(0.05)
        await store.append(record.id, "progress", {"step": 1, "total_steps": 1})
        await store.append(record.id, "completed", {"result": {}})
    assert seen == ["progress", "completed"]


async def test_sweep_drops_jobs_past_retention_with_their_files(store: JobStore) -> None:
    record = await store.create()
    await store.append(record.id, "completed", {"result": {}}, ("x.png",))
    assert await store.sweep(record.created + 1) == []
    (gone,) = await store.sweep(record.created + 3600)
    assert gone.id == record.id and gone.files == ("x.png",)
    assert await store.get(record.id) is None


async def test_sweep_trims_a_finished_jobs_buffer_to_its_terminal_event(store: JobStore) -> None:
    record = await store.create()
    await store.append(record.id, "progress", {"step": 1, "total_steps": 1})
    await store.append(record.id, "completed", {"result": {}})
    assert [e.name for e in await collect(store, record.id, after=0)] == ["progress", "completed"]
    assert await store.sweep(record.created + 1) == []
    assert [(e.id, e.name) for e in await collect(store, record.id, after=0)] == [(2, "completed")]


async def test_a_job_keeps_where_to_announce_its_end_and_a_live_one_is_not_lost(
    store: JobStore,
) -> None:
    record = await store.create(webhook_url="http://hooks.example/x", base_url="http://a:1/")
    read = await store.get(record.id)
    assert read is not None
    assert (read.webhook_url, read.base_url) == ("http://hooks.example/x", "http://a:1/")
    assert await store.fail_lost() == []


async def test_a_lost_job_is_failed_once_however_many_replicas_scan(redis_url: str) -> None:
    import redis.asyncio as redis

    from stream.redis_state import RedisJobStore

    clients = [redis.Redis.from_url(redis_url) for _ in range(3)]
    prefix = f"test-{secrets.token_hex(4)}"
    stores = [
        RedisJobStore(client, buffer_size=3, retention_s=60, lease_s=0.05, prefix=prefix)
        for client in clients
    ]
    record = await stores[0].create(webhook_url="http://hooks.example/x")
    await anyio.sleep(0.2)  # its lease runs out: nobody renews it
    found: list[list[JobRecord]] = []

    async def scan(store: JobStore) -> None:
        found.append(await store.fail_lost())

    async with anyio.create_task_group() as group:
        for store in stores:
            group.start_soon(scan, store)
    failed = [lost for each in found for lost in each]
    assert [(lost.id, lost.status, lost.webhook_url) for lost in failed] == [
        (record.id, "failed", "http://hooks.example/x")
    ]
    assert failed[0].error is not None and failed[0].error["code"] == "replica_failed"
    assert await stores[0].fail_lost() == []  # no longer among the unfinished
    for client in clients:
        await client.aclose()
