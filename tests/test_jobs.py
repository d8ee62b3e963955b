"""The in-process job store: snapshots folded from events, bounded buffers, followers."""

from __future__ import annotations

import anyio
import pytest

from stream.jobs import JobEvent, MemoryJobStore


async def collect(store: MemoryJobStore, job_id: str, after: int) -> list[JobEvent]:
    return [event async for event in store.follow(job_id, after)]


async def test_snapshot_follows_the_events_and_a_terminal_state_is_final() -> None:
    store = MemoryJobStore(buffer_size=8, retention_s=60)
    record = await store.create()
    await store.append(record.id, "progress", {"step": 2, "total_steps": 8})
    assert (record.status, record.step, record.total_steps) == ("in_progress", 2, 8)
    await store.append(record.id, "cancelled", {"error": {"message": "the job was cancelled"}})
    late = await store.append(record.id, "completed", {"result": {"data": []}}, ("a.png",))
    assert late is None
    assert record.status == "cancelled" and record.result is None and record.files == ()


async def test_a_resume_older_than_the_buffer_starts_at_the_oldest_event_kept() -> None:
    store = MemoryJobStore(buffer_size=3, retention_s=60)
    record = await store.create()
    for step in range(1, 6):
        await store.append(record.id, "progress", {"step": step, "total_steps": 5})
    follower = store.follow(record.id, after=1)
    assert [(await anext(follower)).id for _ in range(3)] == [3, 4, 5]
    await store.append(record.id, "completed", {"result": {}})
    assert [event.id async for event in follower] == [6]


async def test_a_sweep_trims_a_finished_job_to_its_terminal_event() -> None:
    store = MemoryJobStore(buffer_size=8, retention_s=60)
    record = await store.create()
    await store.append(record.id, "queued", {})
    await store.append(record.id, "completed", {"result": {"data": []}})
    assert len(await collect(store, record.id, after=0)) == 2
    assert await store.sweep(record.created + 1) == []
    assert [(e.id, e.name) for e in await collect(store, record.id, after=0)] == [(2, "completed")]


async def test_a_follower_gets_new_events_as_they_come_and_stops_after_the_terminal_one() -> None:
    store = MemoryJobStore(buffer_size=8, retention_s=60)
    record = await store.create()
    await store.append(record.id, "queued", {})
    seen: list[str] = []

    async def follow() -> None:
        async for event in store.follow(record.id, after=0):
            seen.append(event.name)

    async with anyio.create_task_group() as group:
        group.start_soon(follow)
        await anyio.wait_all_tasks_blocked()
        assert seen == ["queued"]
        await store.append(record.id, "progress", {"step": 1, "total_steps": 1})
        await store.append(record.id, "failed", {"error": {"message": "no"}})
    assert seen == ["queued", "progress", "failed"]


@pytest.mark.parametrize(("age_s", "kept"), [(10.0, True), (61.0, False)])
async def test_finished_records_expire_after_the_retention(
    monkeypatch: pytest.MonkeyPatch, age_s: float, kept: bool
) -> None:
    store = MemoryJobStore(buffer_size=8, retention_s=60)
    record = await store.create()
    await store.append(record.id, "completed", {"result": {}}, ("x.png",))
    assert record.finished_at is not None
    later = record.finished_at + age_s
    monkeypatch.setattr("stream.jobs.time.time", lambda: later)
    assert (await store.get(record.id) is not None) is kept
    assert [r.files for r in await store.sweep(later)] == ([] if kept else [("x.png",)])


async def test_unfinished_records_never_expire() -> None:
    store = MemoryJobStore(buffer_size=8, retention_s=0.001)
    record = await store.create()
    assert await store.sweep(record.created + 10**6) == []
