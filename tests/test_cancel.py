"""Cancel means stop: a client that leaves (stream or plain) stops its job at the next step.

The real pipeline on the embedded model runs behind a real uvicorn server. The engine is
wrapped only to note how many steps had run when the server cancelled the job, and the
runner counts steps and VAE decodes, so the tests can show that at most one more step ran
and that the final decode never did.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.engine import Emit, StopRequested, ThreadedEngine, _Ticket
from pipeline.factory import create_flux_runner
from pipeline.jobs import Event, Job, ModelProfile, Progress, Result
from pipeline.loading import ModelSpec
from pipeline.runner import FluxRunner
from stream.app import create_app
from tests.conftest import make_settings
from tests.servers import live_server
from tests.waiting import wait_until

LONG_JOB = {"prompt": "a long walk", "size": "64x64", "num_inference_steps": 1000}


class CountingRunner:
    """The real runner, counting the denoising steps it runs and the VAE decodes it makes."""

    def __init__(self, runner: FluxRunner) -> None:
        self._runner = runner
        self.steps = 0
        self.decodes = 0
        vae = runner.pipe.vae
        decode = vae.decode

        def counting_decode(*args: object, **kwargs: object) -> object:
            self.decodes += 1
            return decode(*args, **kwargs)

        vae.decode = counting_decode

    @property
    def profile(self) -> ModelProfile:
        return self._runner.profile

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        def counting_emit(event: Event) -> None:
            if isinstance(event, Progress):
                self.steps += 1
            emit(event)

        return self._runner.run(job, counting_emit, stop_requested)


class ProbedEngine(ThreadedEngine):
    """Notes the runner's step count at the moment the server cancels a job."""

    def __init__(self, runner: CountingRunner) -> None:
        super().__init__(runner, max_queued=4)
        self.counting = runner
        self.steps_at_cancel: list[int] = []

    def _forget(self, ticket: _Ticket) -> None:
        self.steps_at_cancel.append(self.counting.steps)
        super()._forget(ticket)


@pytest.fixture(scope="module")
def counting_runner(model_cache: Path) -> CountingRunner:
    return CountingRunner(create_flux_runner(ModelSpec(cache_dir=model_cache)))


@pytest.fixture
def engine(counting_runner: CountingRunner) -> ProbedEngine:
    return ProbedEngine(counting_runner)


@pytest.fixture
def server(engine: ProbedEngine, tmp_path: Path) -> Iterator[str]:
    with live_server(
        create_app(make_settings(tmp_path, max_steps=1000, max_partial_images=100), engine)
    ) as url:
        yield url


def open_stream_then_leave(base_url: str) -> dict[str, object]:
    """Read the stream up to its first partial image, then drop the connection."""
    body = {**LONG_JOB, "stream": True, "partial_images": 100}  # the first at step 10
    with httpx.stream(
        "POST", f"{base_url}/v1/images/generations", json=body, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended before its first partial image")


def test_stream_disconnect_stops_the_job_within_one_step_and_skips_the_decode(
    server: str, engine: ProbedEngine
) -> None:
    runner = engine.counting
    decodes_before = runner.decodes
    first = open_stream_then_leave(server)
    assert first["type"] == "image_generation.partial_image"
    wait_until(lambda: engine.load().running == 0, "the job to stop")
    (steps_at_cancel,) = engine.steps_at_cancel
    assert steps_at_cancel < 1000
    assert runner.steps <= steps_at_cancel + 1
    assert runner.decodes == decodes_before


def test_plain_request_disconnect_stops_the_job_and_the_worker_takes_the_next(
    server: str, engine: ProbedEngine
) -> None:
    runner = engine.counting
    steps_before, decodes_before = runner.steps, runner.decodes
    host, port = server.removeprefix("http://").split(":")
    payload = json.dumps(LONG_JOB).encode()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        wait_until(lambda: runner.steps >= steps_before + 2, "the job to run two steps")
    wait_until(lambda: engine.load().running == 0, "the job to stop")
    (steps_at_cancel,) = engine.steps_at_cancel
    assert runner.steps <= steps_at_cancel + 1
    assert runner.steps - steps_before < 1000
    assert runner.decodes == decodes_before
    follow_up = httpx.post(
        f"{server}/v1/images/generations",
        json={"prompt": "next", "size": "64x64", "num_inference_steps": 2},
        timeout=30,
    )
    assert follow_up.status_code == 200
    assert runner.decodes == decodes_before + 1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_cancels_leak_no_threads_file_handles_or_memory(
    server: str, engine: ProbedEngine
) -> None:
    def cancel_one() -> None:
        open_stream_then_leave(server)
        wait_until(lambda: engine.load().running == 0, "the job to stop")

    for _ in range(3):  # warm up thread pools and caches first
        cancel_one()
    threads, fds, rss = threading.active_count(), open_fds(), rss_bytes()
    for _ in range(20):
        cancel_one()
    wait_until(lambda: threading.active_count() <= threads, "threads to end")
    assert open_fds() <= fds + 2
    assert rss_bytes() - rss < 64 * 1024 * 1024
    assert len(engine.steps_at_cancel) == 23
    metrics = httpx.get(f"{server}/metrics").text
    assert "fluxstream_jobs_cancelled_total 23.0" in metrics
