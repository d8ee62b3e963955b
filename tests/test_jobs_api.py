"""The jobs API against a real server: submit, status, cancel, resumable events, expiry,
webhooks. The scripted engine holds a job before its result when a test needs it running."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.jobs import ContentFiltered, JobFailed
from stream.app import create_app
from tests.conftest import make_settings
from tests.fakes import FakeEngine
from tests.images import encoded, noise_image
from tests.servers import Delivery, live_server, webhook_receiver

JOB = {"prompt": "a lighthouse", "size": "64x64", "partial_images": 2}


@dataclass(frozen=True)
class SseEvent:
    id: str | None
    name: str
    data: dict[str, Any]


def sse_events(response: httpx.Response) -> Iterator[SseEvent]:
    """Parse an SSE body as EventSource does (comments skipped, fields per block)."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields:
                yield SseEvent(
                    fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def events_of(url: str, headers: dict[str, str] | None = None) -> list[SseEvent]:
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response))


def submit(base_url: str, body: dict[str, Any] = JOB) -> dict[str, Any]:
    response = httpx.post(f"{base_url}/v1/images/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(base_url: str, job_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = httpx.get(f"{base_url}/v1/images/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never became {status}")


@pytest.fixture
def held(fake_engine: FakeEngine) -> Iterator[threading.Event]:
    """Jobs stay running (after their previews, before their result) until set."""
    fake_engine.release.clear()
    yield fake_engine.release
    fake_engine.release.set()


def test_submit_answers_202_at_once_with_id_status_and_events_url(
    fake_server: str, held: threading.Event
) -> None:
    job = submit(fake_server)
    assert job["status"] == "queued"
    assert job["id"].startswith("imgjob_")
    assert job["events_url"] == f"{fake_server}/v1/images/jobs/{job['id']}/events"
    assert isinstance(job["created"], int)


def test_finished_job_shows_progress_and_the_openai_shaped_result(fake_server: str) -> None:
    job = wait_for(fake_server, submit(fake_server)["id"], "completed")
    assert job["progress"] == {"step": 4, "total_steps": 4}
    assert job["error"] is None
    result = job["result"]
    assert result["size"] == "64x64"
    image = httpx.get(result["data"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert isinstance(result["data"][0]["seed"], int)


def test_events_are_queued_progress_partials_then_completed_each_with_an_id(
    fake_server: str,
) -> None:
    job = submit(fake_server)
    events = events_of(job["events_url"])
    names = [event.name for event in events]
    assert names[0] == "queued"
    assert names[-1] == "completed"
    assert names.count("progress") == 4
    partials = [event.data for event in events if event.name == "partial_image"]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    assert partials[0]["b64_json"] != partials[1]["b64_json"]
    assert [event.id for event in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[-1].data["result"]["data"][0]["url"].startswith("http://127.0.0.1")


def test_reconnect_with_last_event_id_replays_only_what_was_missed(
    fake_server: str, held: threading.Event
) -> None:
    job = submit(fake_server)
    with httpx.stream("GET", job["events_url"], timeout=30) as response:
        seen = []
        for event in sse_events(response):
            seen.append(event)
            if event.name == "partial_image":
                break
    last_id = seen[-1].id
    assert last_id is not None
    held.set()
    rest = events_of(job["events_url"], headers={"Last-Event-ID": last_id})
    assert rest[0].id == str(int(last_id) + 1)
    assert [event.name for event in rest][-1] == "completed"
    assert [int(event.id or 0) for event in seen + rest] == list(range(1, len(seen + rest) + 1))


def test_a_watcher_leaving_does_not_cancel_the_job(
    fake_server: str, fake_engine: FakeEngine, held: threading.Event
) -> None:
    job = submit(fake_server)
    with httpx.stream("GET", job["events_url"], timeout=30) as response:
        next(sse_events(response))
    held.set()
    assert wait_for(fake_server, job["id"], "completed")["result"] is not None
    assert not fake_engine.handles[0].cancelled


def test_delete_cancels_a_running_job_and_watchers_see_cancelled(
    fake_server: str, fake_engine: FakeEngine, held: threading.Event
) -> None:
    job = submit(fake_server)
    wait_for(fake_server, job["id"], "in_progress")
    cancelled = httpx.delete(f"{fake_server}/v1/images/jobs/{job['id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"]["code"] == "cancelled"
    assert fake_engine.handles[0].cancelled
    events = events_of(job["events_url"])
    assert events[-1].name == "cancelled"
    assert "completed" not in [event.name for event in events]
    assert httpx.get(f"{fake_server}/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"


def test_delete_leaves_a_finished_job_as_it_was(fake_server: str) -> None:
    job = wait_for(fake_server, submit(fake_server)["id"], "completed")
    response = httpx.delete(f"{fake_server}/v1/images/jobs/{job['id']}")
    assert response.json()["status"] == "completed"


def test_failed_job_reports_failed_with_a_readable_message(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.script = [JobFailed("the image could not be generated")]
    job = submit(fake_server)
    events = events_of(job["events_url"])
    assert [event.name for event in events] == ["queued", "failed"]
    assert events[-1].data["error"]["message"] == "the image could not be generated"
    assert wait_for(fake_server, job["id"], "failed")["result"] is None


def test_job_whose_images_are_all_flagged_fails_with_content_policy_violation(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.script = [ContentFiltered("every image was flagged")]
    job = submit(fake_server)
    failed = wait_for(fake_server, job["id"], "failed")
    assert failed["error"]["code"] == "content_policy_violation"


def test_job_makes_the_partial_images_it_asks_for_without_stream(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    submit(fake_server, {**JOB, "partial_images": 3})
    assert fake_engine.jobs[0].partial_images == 3


def test_job_may_make_several_images_even_when_it_asks_to_stream(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    job = submit(fake_server, {**JOB, "n": 2, "seed": 5, "stream": True})
    result = wait_for(fake_server, job["id"], "completed")["result"]
    assert [item["seed"] for item in result["data"]] == [5, 6]


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("DELETE", ""), ("GET", "/events")])
def test_unknown_job_is_an_openai_shaped_404(fake_server: str, method: str, suffix: str) -> None:
    response = httpx.request(method, f"{fake_server}/v1/images/jobs/imgjob_nope{suffix}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "64x64"}, "prompt"),
        ({"prompt": "x", "size": "huge"}, "size"),
        ({"prompt": "x", "partial_images": 9}, "partial_images"),
        ({"prompt": "x", "webhook_url": "http://10.0.0.1/hook"}, "webhook_url"),
        ({"prompt": "x", "webhook_url": "file:///etc/passwd"}, "webhook_url"),
    ],
)
def test_bad_job_request_is_a_400_and_nothing_is_queued(
    fake_server: str, fake_engine: FakeEngine, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{fake_server}/v1/images/jobs", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert fake_engine.jobs == []


@pytest.mark.parametrize("last_id", [b"abc", "\u00b2".encode("latin-1"), b"1" * 5000])
def test_bad_last_event_id_is_a_400(fake_server: str, last_id: bytes) -> None:
    job = submit(fake_server)
    response = httpx.get(job["events_url"], headers={b"Last-Event-ID": last_id})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "Last-Event-ID"


def test_queue_full_is_429_with_retry_after(fake_server: str, fake_engine: FakeEngine) -> None:
    fake_engine.full = True
    response = httpx.post(f"{fake_server}/v1/images/jobs", json=JOB)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "8"


def test_finished_job_is_dropped_with_its_files_after_its_retention(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, job_ttl_s=0.2, sweep_interval_s=0.05)
    with live_server(create_app(settings, FakeEngine())) as url:
        job = wait_for(url, submit(url)["id"], "completed")
        file_url = job["result"]["data"][0]["url"]
        deadline = time.monotonic() + 30
        while httpx.get(file_url).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(file_url).status_code == 404
        assert httpx.get(f"{url}/v1/images/jobs/{job['id']}").status_code == 404
    assert list((tmp_path / "images").glob("*.png")) == []


def test_webhook_gets_the_final_job_after_a_failed_attempt(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, webhook_allowed_hosts=("127.0.0.1",), webhook_backoff_s=0.01)
    with (
        webhook_receiver([500, 200]) as (hook, deliveries),
        live_server(create_app(settings, FakeEngine())) as url,
    ):
        job = submit(url, {**JOB, "webhook_url": hook})
        deadline = time.monotonic() + 30
        while len(deliveries) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(deliveries) == 2
    assert [delivery.headers["webhook-id"] for delivery in deliveries] == [job["id"]] * 2
    bodies = [delivery.json() for delivery in deliveries]
    assert bodies[1]["id"] == job["id"]
    assert bodies[1]["status"] == "completed"
    assert bodies[1]["result"]["data"][0]["url"].startswith(url)


def wait_for_deliveries(deliveries: list[Delivery], count: int) -> None:
    """Wait until `count` webhooks arrived, then a little longer, so that a duplicate would."""
    deadline = time.monotonic() + 30
    while len(deliveries) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)


def test_webhook_of_a_job_cancelled_while_running_is_delivered_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, webhook_allowed_hosts=("127.0.0.1",))
    engine = FakeEngine()
    engine.release.clear()
    with (
        webhook_receiver([200]) as (hook, deliveries),
        live_server(create_app(settings, engine)) as url,
    ):
        job = submit(url, {**JOB, "webhook_url": hook})
        wait_for(url, job["id"], "in_progress")
        assert httpx.delete(f"{url}/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"
        engine.release.set()
        wait_for_deliveries(deliveries, 1)
    assert [delivery.json()["status"] for delivery in deliveries] == ["cancelled"]
    assert deliveries[0].json()["error"]["code"] == "cancelled"


def test_edit_upload_as_a_job_streams_image_edit_events(fake_server: str) -> None:
    photo = encoded(noise_image((64, 64)), "PNG")
    created = httpx.post(
        f"{fake_server}/v1/images/jobs",
        files=[("image[]", ("photo.png", photo, "application/octet-stream"))],
        data={"prompt": "make it blue", "partial_images": "2", "strength": "0.5"},
    )
    assert created.status_code == 202, created.text
    job = created.json()
    events = events_of(job["events_url"])
    partials = [event for event in events if event.name == "partial_image"]
    assert [event.data["type"] for event in partials] == ["image_edit.partial_image"] * 2
    assert events[-1].name == "completed"
    assert wait_for(fake_server, job["id"], "completed")["result"]["data"][0]["url"]


def test_json_edit_with_a_data_url_as_a_job_completes(fake_server: str) -> None:
    photo = base64.b64encode(encoded(noise_image((64, 64)), "PNG")).decode()
    job = submit(
        fake_server,
        {"prompt": "x", "images": [{"image_url": f"data:image/png;base64,{photo}"}]},
    )
    assert wait_for(fake_server, job["id"], "completed")["status"] == "completed"


def test_bad_edit_upload_as_a_job_is_a_400_before_anything_is_queued(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    response = httpx.post(
        f"{fake_server}/v1/images/jobs",
        files=[("image", ("x.png", b"not an image", "image/png"))],
        data={"prompt": "x"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "image"
    assert fake_engine.jobs == []
