"""Queueing as a client sees it: position comments, queue-wait and run-time limits.

The real `ThreadedEngine` with a model-free `StepRunner` behind a real uvicorn server.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pipeline.engine import ThreadedEngine
from stream.app import create_app
from tests.conftest import make_settings
from tests.fakes import StepRunner
from tests.servers import live_server
from tests.waiting import wait_until

SMALL = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}


@contextlib.contextmanager
def serve(tmp_path: Path, engine: ThreadedEngine) -> Iterator[str]:
    with live_server(create_app(make_settings(tmp_path, max_steps=1000), engine)) as url:
        yield url


def post(base_url: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=30)


def start_blocking_job(base_url: str, engine: ThreadedEngine) -> threading.Thread:
    """A plain request that occupies the worker until the runner's gate opens."""
    thread = threading.Thread(target=post, args=(base_url, SMALL), daemon=True)
    thread.start()
    wait_until(lambda: engine.load().running > 0, "the blocking job to start")
    return thread


def test_queued_stream_sends_position_comments_then_the_usual_frames(tmp_path: Path) -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=4)
    with serve(tmp_path, engine) as url:
        blocker = start_blocking_job(url, engine)
        body = {**SMALL, "stream": True, "partial_images": 1}
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(lines)
            release.set()
            rest = list(lines)
        blocker.join()
    assert first == ": queued position=1"  # no job was timed yet: no estimate is made up
    events = [json.loads(line[6:]) for line in rest if line.startswith("data: ")]
    assert [e["type"] for e in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert events[0]["step"] == 1 and events[0]["total_steps"] == 2
    assert not any(line.startswith("id:") for line in rest)


def test_the_first_stream_on_an_idle_server_gets_no_queued_comment(tmp_path: Path) -> None:
    engine = ThreadedEngine(StepRunner(), max_queued=4)
    with serve(tmp_path, engine) as url:
        response = post(url, {**SMALL, "stream": True})
    lines = [line for line in response.text.split("\n") if line]
    assert lines[0].startswith("event: ")
    assert not any(line.startswith(": queued") for line in lines)


def hold_one_timed_job(base_url: str, engine: ThreadedEngine, release: threading.Event) -> None:
    """Run one plain job that the runner holds for 1.5 s, so the engine has measured a run."""
    release.clear()
    first = start_blocking_job(base_url, engine)
    time.sleep(1.5)
    release.set()
    first.join()
    release.clear()


def test_a_queued_streams_estimate_comes_from_the_measured_run_time(tmp_path: Path) -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=4)
    with serve(tmp_path, engine) as url:
        hold_one_timed_job(url, engine, release)
        blocker = start_blocking_job(url, engine)
        with httpx.stream(
            "POST", f"{url}/v1/images/generations", json={**SMALL, "stream": True}, timeout=30
        ) as response:
            first = next(response.iter_lines())
            release.set()
        blocker.join()
    assert first.startswith(": queued position=1 estimated_wait_s=")
    assert int(first.rpartition("=")[2]) >= 1  # rounded from >= 1.5 s


def test_a_second_queued_stream_moves_up_when_the_one_ahead_leaves(tmp_path: Path) -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=4)
    body = {**SMALL, "stream": True}
    with serve(tmp_path, engine) as url:
        blocker = start_blocking_job(url, engine)
        ahead = httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=30)
        ahead_lines = ahead.__enter__().iter_lines()
        assert next(ahead_lines) == ": queued position=1"
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines) == ": queued position=2"
            ahead.__exit__(None, None, None)  # the client ahead hangs up
            assert next(line for line in lines if line) == ": queued position=1"
            release.set()
            types = [json.loads(line[6:])["type"] for line in lines if line.startswith("data: ")]
        blocker.join()
    assert types == ["image_generation.completed"]


def test_plain_request_that_waits_too_long_in_the_queue_gets_503(tmp_path: Path) -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=4, max_queue_wait_s=0.1)
    with serve(tmp_path, engine) as url:
        blocker = start_blocking_job(url, engine)
        response = post(url, SMALL)
        streamed = httpx.post(
            f"{url}/v1/images/generations", json={**SMALL, "stream": True}, timeout=30
        )
        release.set()
        blocker.join()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_timeout"
    # Nothing timed yet: the SDKs are told to retry soon, not a made-up wait.
    assert response.headers["Retry-After"] == "1"
    assert response.headers["retry-after-ms"] == "1000"
    frames = [line for line in streamed.text.split("\n") if line.startswith("data: ")]
    error = json.loads(frames[-1][6:])
    assert error["type"] == "error" and error["error"]["code"] == "queue_timeout"


def test_a_queue_timeout_503_says_when_to_retry_from_measured_run_times(tmp_path: Path) -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=4, max_queue_wait_s=0.1)
    with serve(tmp_path, engine) as url:
        hold_one_timed_job(url, engine, release)
        blocker = start_blocking_job(url, engine)
        response = post(url, SMALL)
        release.set()
        blocker.join()
    assert response.status_code == 503
    seconds = int(response.headers["Retry-After"])
    assert seconds >= 2  # one job ahead of a new one, measured at >= 1.5 s, rounded up
    assert response.headers["retry-after-ms"] == str(seconds * 1000)


@pytest.mark.parametrize("stream", [False, True])
def test_a_job_that_runs_too_long_is_stopped(tmp_path: Path, stream: bool) -> None:
    runner = StepRunner(step_delay_s=0.01)
    engine = ThreadedEngine(runner, max_queued=4, max_run_s=0.2)
    with serve(tmp_path, engine) as url:
        response = post(url, {**SMALL, "num_inference_steps": 1000, "stream": stream})
    assert runner.steps_run < 1000
    if stream:
        error = json.loads(response.text.strip().split("\n")[-1][6:])
        assert error["error"]["code"] == "job_timeout"
    else:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "job_timeout"


def test_the_sdk_does_not_rerun_a_job_that_ran_too_long(tmp_path: Path) -> None:
    runner = StepRunner(step_delay_s=0.01)
    engine = ThreadedEngine(runner, max_queued=4, max_run_s=0.2)
    with serve(tmp_path, engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)
        with pytest.raises(openai.APIStatusError) as raised:
            client.images.generate(
                model="flux.1-dev", prompt="a fox", extra_body={"num_inference_steps": 1000}
            )
    assert raised.value.status_code == 503
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(runner.calls) == 1
