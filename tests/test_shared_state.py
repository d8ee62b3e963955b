"""Two app replicas sharing Redis: any replica serves the urls and jobs of any other."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.jobs import Result
from stream.app import create_app
from tests.conftest import make_settings
from tests.fakes import FakeEngine, picture
from tests.redis_server import redis_server
from tests.servers import live_server, webhook_receiver
from tests.test_jobs_api import JOB, events_of, submit, wait_for, wait_for_deliveries


def replica_app(tmp_path: Path, name: str, url: str, engine: FakeEngine, **settings: Any) -> Any:
    """Replica `name` of a cluster that shares the Redis at `url`; its own data folder."""
    return create_app(
        make_settings(
            tmp_path / name, state_store="redis", redis_url=url, replica_name=name, **settings
        ),
        engine,
    )


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[str, str, FakeEngine, FakeEngine]]:
    """Replicas A and B: own engines, own data folders, one Redis."""
    with redis_server() as url, ExitStack() as stack:
        engines = FakeEngine(), FakeEngine()
        bases = [
            stack.enter_context(live_server(replica_app(tmp_path, name, url, engine)))
            for name, engine in zip("AB", engines, strict=True)
        ]
        yield bases[0], bases[1], engines[0], engines[1]


def test_url_result_made_by_one_replica_downloads_from_the_other(
    replicas: tuple[str, str, FakeEngine, FakeEngine],
) -> None:
    a, b, _, _ = replicas
    made = httpx.post(f"{a}/v1/images/generations", json={"prompt": "x", "size": "64x64"})
    assert made.headers["x-fluxstream-replica"] == "A"
    url = made.json()["data"][0]["url"]
    download = httpx.get(url.replace(a, b))
    assert download.status_code == 200
    assert download.headers["x-fluxstream-replica"] == "B"
    assert download.content.startswith(b"\x89PNG")


def test_job_started_on_one_replica_is_watched_and_resumed_on_the_other(
    replicas: tuple[str, str, FakeEngine, FakeEngine],
) -> None:
    a, b, _, _ = replicas
    job = submit(a)
    wait_for(b, job["id"], "completed")
    events = events_of(f"{b}/v1/images/jobs/{job['id']}/events")
    assert events[0].name == "queued" and events[-1].name == "completed"
    resumed = events_of(
        f"{b}/v1/images/jobs/{job['id']}/events", headers={"Last-Event-ID": events[1].id or ""}
    )
    assert [event.id for event in resumed] == [event.id for event in events[2:]]
    result = httpx.get(f"{b}/v1/images/jobs/{job['id']}").json()["result"]
    assert httpx.get(result["data"][0]["url"].replace(a, b)).status_code == 200


def test_cancel_through_another_replica_is_final_everywhere(
    replicas: tuple[str, str, FakeEngine, FakeEngine],
) -> None:
    a, b, engine_a, _ = replicas
    engine_a.release.clear()
    job = submit(a, {**JOB, "partial_images": 0})
    wait_for(a, job["id"], "in_progress")
    assert httpx.delete(f"{b}/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"
    engine_a.release.set()
    assert wait_for(a, job["id"], "cancelled")["result"] is None
    assert events_of(f"{a}/v1/images/jobs/{job['id']}/events")[-1].name == "cancelled"


def stop_redis(url: str) -> None:
    import redis  # the cluster extra; redis_server() has skipped the test without it

    redis.Redis.from_url(url).shutdown(nosave=True)


def test_a_store_outage_while_a_job_runs_fails_that_job_only_and_the_replica_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine()
    engine.release.clear()
    with redis_server() as redis_url:
        settings = make_settings(tmp_path, state_store="redis", redis_url=redis_url)
        with live_server(create_app(settings, engine)) as base:
            job = submit(base)
            wait_for(base, job["id"], "in_progress")
            stop_redis(redis_url)
            engine.release.set()  # the result now has nowhere to go
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                "was not followed to its end" in record.message for record in caplog.records
            ):
                if httpx.get(f"{base}/health").json()["status"] != "ok":
                    break
                time.sleep(0.02)
            health = httpx.get(f"{base}/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_job_the_store_could_not_record_is_cancelled_not_left_running(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.release.clear()
    with redis_server() as redis_url:
        settings = make_settings(tmp_path, state_store="redis", redis_url=redis_url)
        with live_server(create_app(settings, engine)) as base:
            stop_redis(redis_url)
            response = httpx.post(f"{base}/v1/images/jobs", json=JOB, timeout=30)
            engine.release.set()
    assert response.status_code == 500
    assert [handle.cancelled for handle in engine.handles] == [True]


def test_a_job_whose_replica_stopped_fails_for_those_watching_on_another(
    tmp_path: Path,
) -> None:
    with redis_server() as url:
        engine_a = FakeEngine()
        engine_a.release.clear()
        apps = [
            replica_app(tmp_path, name, url, engine, job_lease_s=0.5)
            for name, engine in (("A", engine_a), ("B", FakeEngine()))
        ]
        with live_server(apps[1]) as b:
            with live_server(apps[0]) as a:
                job = submit(a, {**JOB, "partial_images": 0})
                wait_for(b, job["id"], "in_progress")
            # A is gone without recording an outcome; its lease runs out.
            failed = wait_for(b, job["id"], "failed")
            assert failed["error"]["code"] == "replica_failed"
            events = events_of(f"{b}/v1/images/jobs/{job['id']}/events")
            assert [event.name for event in events][-1] == "failed"


def test_a_job_whose_replica_stopped_still_gets_its_webhook_once(tmp_path: Path) -> None:
    """B and C both scan for lost jobs; only the one whose append fails the job sends it."""
    with redis_server() as url, webhook_receiver([200]) as (hook, deliveries), ExitStack() as stack:
        engine_a = FakeEngine()
        engine_a.release.clear()
        apps = [
            replica_app(
                tmp_path, name, url, engine, job_lease_s=0.5, webhook_allowed_hosts=("127.0.0.1",)
            )
            for name, engine in (("A", engine_a), ("B", FakeEngine()), ("C", FakeEngine()))
        ]
        b, _ = (stack.enter_context(live_server(app)) for app in apps[1:])
        with live_server(apps[0]) as a:
            job = submit(a, {**JOB, "partial_images": 0, "webhook_url": hook})
            wait_for(b, job["id"], "in_progress")
        # A is gone without recording an outcome; its lease runs out.
        wait_for_deliveries(deliveries, 1)
        time.sleep(1)  # eight more scans by each of B and C
    assert len(deliveries) == 1
    body = deliveries[0].json()
    assert (body["id"], body["status"]) == (job["id"], "failed")
    assert body["error"]["code"] == "replica_failed"
    assert body["events_url"] == job["events_url"]  # where its creator reached the server
    assert deliveries[0].headers["webhook-id"] == job["id"]


def test_cancel_through_another_replica_sends_the_webhook_once(
    tmp_path: Path,
) -> None:
    with redis_server() as url, webhook_receiver([200]) as (hook, deliveries), ExitStack() as stack:
        engine_a = FakeEngine()
        engine_a.release.clear()
        a, b = (
            stack.enter_context(
                live_server(
                    replica_app(tmp_path, name, url, engine, webhook_allowed_hosts=("127.0.0.1",))
                )
            )
            for name, engine in (("A", engine_a), ("B", FakeEngine()))
        )
        job = submit(a, {**JOB, "partial_images": 0, "webhook_url": hook})
        wait_for(a, job["id"], "in_progress")
        assert httpx.delete(f"{b}/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"
        engine_a.release.set()
        wait_for(a, job["id"], "cancelled")
        wait_for_deliveries(deliveries, 1)
    assert [delivery.json()["status"] for delivery in deliveries] == ["cancelled"]


def test_a_queued_job_cancelled_through_another_replica_leaves_its_queue(tmp_path: Path) -> None:
    with redis_server() as url, ExitStack() as stack:
        # No progress before a held result: the job waits on A as if queued.
        engine_a = FakeEngine(script=[Result(images=(picture((64, 64), 1),), seeds=(1,))])
        a, b = (
            stack.enter_context(
                live_server(replica_app(tmp_path, name, url, engine, job_lease_s=0.2))
            )
            for name, engine in (("A", engine_a), ("B", FakeEngine()))
        )
        engine_a.release.clear()
        job = submit(a, {**JOB, "partial_images": 0})
        assert httpx.delete(f"{b}/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"
        deadline = time.monotonic() + 30
        while not engine_a.handles[0].cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine_a.handles[0].cancelled
        assert wait_for(a, job["id"], "cancelled")["error"]["code"] == "cancelled"
