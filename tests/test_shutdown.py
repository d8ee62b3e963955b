"""Graceful shutdown of a real `python -m stream` process receiving SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx

from tests.servers import server_process
from tests.waiting import wait_until

STREAM = {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 100}


def health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.TransportError:
        return 0


def draining_server(
    model_cache: Path, data_dir: Path, grace_s: float
) -> AbstractContextManager[tuple[subprocess.Popen[bytes], str]]:
    """A server with room for long streamed jobs and a grace period of `grace_s`."""
    flags = ["--shutdown-grace-s", str(grace_s), "--max-steps", "10000"]
    flags += ["--max-partial-images", "100", "--log-level", "warning"]
    return server_process(model_cache, data_dir, *flags, timeout_s=120)


def data_lines(lines: Iterator[str]) -> Iterator[dict[str, object]]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


def test_sigterm_drains_then_stops_what_outlasts_the_grace_period_and_exits(
    model_cache: Path, tmp_path: Path
) -> None:
    """A short running job finishes; a long one queued behind it starts, is stopped when the
    grace period ends, and its stream gets an `error` frame; new work is refused meanwhile."""
    data_dir = tmp_path / "images"
    generations = "/v1/images/generations"
    with draining_server(model_cache, data_dir, grace_s=10) as (process, url):
        short = {**STREAM, "num_inference_steps": 30}  # done well inside the grace period
        long = {**STREAM, "num_inference_steps": 10000}
        with (
            httpx.stream("POST", f"{url}{generations}", json=short, timeout=60) as first,
            httpx.stream("POST", f"{url}{generations}", json=long, timeout=60) as second,
        ):
            first_events = data_lines(first.iter_lines())
            assert next(first_events)["type"] == "image_generation.partial_image"
            second_lines = second.iter_lines()
            assert next(second_lines).startswith(": queued position=1")
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: health(url) == 503, "health to report draining", 120, 0.05)
            refused = httpx.post(f"{url}{generations}", json={"prompt": "x"})
            first_types = [event["type"] for event in first_events]
            second_last = list(data_lines(second_lines))[-1]
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutdown"
    assert first_types[-1] == "image_generation.completed"
    assert "error" not in first_types
    assert second_last["type"] == "error"
    assert second_last["error"]["code"] == "shutdown"  # type: ignore[index]
    assert not [path for path in data_dir.iterdir() if path.name.startswith(".partial")]


def test_results_finished_during_the_drain_reach_their_stream_and_their_job(
    model_cache: Path, tmp_path: Path
) -> None:
    """The engine finishing a job is not the end of it: its image is still to be encoded,
    stored and sent, by the request's stream and by the job's follower."""
    # AVIF encodes slowly: the engine is done with the job well before its answer is.
    big = {"prompt": "x", "size": "1024x1024", "num_inference_steps": 3, "output_format": "avif"}
    with draining_server(model_cache, tmp_path / "images", grace_s=60) as (process, url):
        job = httpx.post(f"{url}/v1/images/jobs", json=big, timeout=30).json()
        with (
            httpx.stream(
                "POST", f"{url}/v1/images/generations", json={**big, "stream": True}, timeout=120
            ) as streamed,
            httpx.stream("GET", f"{url}/v1/images/jobs/{job['id']}/events", timeout=120) as events,
        ):
            job_lines = events.iter_lines()
            assert next(line for line in job_lines if line.startswith("event: "))
            process.send_signal(signal.SIGTERM)
            streamed_types = [event["type"] for event in data_lines(streamed.iter_lines())]
            job_events = [line for line in job_lines if line.startswith("event: ")]
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert streamed_types[-1] == "image_generation.completed"
    assert job_events[-1] == "event: completed"
