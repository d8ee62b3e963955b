"""The threaded engine with a scripted runner: queueing, cancelling, failing."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from pipeline.engine import Emit, StopRequested, ThreadedEngine
from pipeline.jobs import (
    EngineClosed,
    Job,
    JobCancelled,
    JobFailed,
    Progress,
    QueueFull,
    Result,
)
from tests.fakes import PROFILE


def job(steps: int = 3) -> Job:
    return Job(
        prompt="x", width=16, height=16, seeds=(1,), num_inference_steps=steps, guidance_scale=1.0
    )


class StepRunner:
    """Emits one Progress per step; each step waits for `release` when it is given."""

    profile = PROFILE

    def __init__(
        self, release: threading.Event | None = None, fail: bool = False, step_delay_s: float = 0
    ) -> None:
        self.release = release
        self.fail = fail
        self.step_delay_s = step_delay_s
        self.steps_run = 0

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        if self.fail:
            raise RuntimeError("/secret/path exploded")
        for step in range(1, job.num_inference_steps + 1):
            if self.release is not None:
                self.release.wait(timeout=10)
            time.sleep(self.step_delay_s)
            if stop_requested():
                raise JobCancelled("cancelled")
            self.steps_run += 1
            emit(Progress(step, job.num_inference_steps))
        return Result(images=(), seeds=job.seeds)


async def collect(engine: ThreadedEngine, the_job: Job) -> list[object]:
    return [event async for event in engine.submit(the_job).events()]


async def test_events_arrive_in_order_and_end_with_the_result() -> None:
    engine = ThreadedEngine(StepRunner(), max_queued=2)
    events = await collect(engine, job(3))
    assert events[:3] == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
    assert isinstance(events[-1], Result)
    await engine.aclose()


async def test_full_queue_refuses_at_once_with_a_retry_estimate() -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=1)
    running = engine.submit(job())
    await asyncio.sleep(0.05)  # let the worker take it, so the queue is empty again
    engine.submit(job())
    with pytest.raises(QueueFull) as raised:
        engine.submit(job())
    assert raised.value.retry_after_s > 0
    release.set()
    running.cancel()
    await engine.aclose()


async def test_cancelled_queued_job_leaves_the_queue_at_once() -> None:
    release = threading.Event()
    runner = StepRunner(release)
    engine = ThreadedEngine(runner, max_queued=1)
    engine.submit(job())
    await asyncio.sleep(0.05)
    queued = engine.submit(job())
    queued.cancel()
    assert engine.queued == 0
    engine.submit(job())  # its place is free again
    with pytest.raises(JobCancelled):
        [event async for event in queued.events()]
    release.set()
    await engine.aclose()


async def test_closing_the_event_stream_stops_the_running_job_within_one_step() -> None:
    runner = StepRunner(step_delay_s=0.02)
    engine = ThreadedEngine(runner, max_queued=1)
    handle = engine.submit(job(steps=100))
    async with contextlib.aclosing(handle.events()) as events:
        async for event in events:
            if isinstance(event, Progress) and event.step == 2:
                break  # what a disconnecting client does: the consumer stops reading
    steps_at_cancel = runner.steps_run
    await asyncio.sleep(0.3)
    assert runner.steps_run <= steps_at_cancel + 1
    assert isinstance((await collect(engine, job(1)))[-1], Result)  # the worker took the next job
    await engine.aclose()


async def test_failed_job_reports_a_safe_message_and_the_worker_goes_on() -> None:
    runner = StepRunner(fail=True)
    engine = ThreadedEngine(runner, max_queued=2)
    with pytest.raises(JobFailed) as raised:
        await collect(engine, job())
    assert "secret" not in str(raised.value)
    runner.fail = False
    assert isinstance((await collect(engine, job()))[-1], Result)
    await engine.aclose()


async def test_closed_engine_refuses_new_jobs_and_fails_queued_ones() -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=2)
    engine.submit(job())
    await asyncio.sleep(0.05)
    queued = engine.submit(job())
    release.set()
    await engine.aclose()
    with pytest.raises(EngineClosed):
        [event async for event in queued.events()]
    with pytest.raises(EngineClosed):
        engine.submit(job())


async def test_engine_is_warming_until_its_start_up_generation_is_done() -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=2, warmup=job(1))
    assert engine.status == "warming"
    queued = engine.submit(job(1))  # requests during warm-up wait in the queue
    release.set()
    assert isinstance([event async for event in queued.events()][-1], Result)
    assert engine.status == "ok"
    await engine.aclose()
    assert engine.status == "closed"


async def test_failed_warm_up_is_reported_as_failed_status() -> None:
    engine = ThreadedEngine(StepRunner(fail=True), max_queued=2, warmup=job(1))
    for _ in range(100):
        if engine.status != "warming":
            break
        await asyncio.sleep(0.01)
    assert engine.status == "failed"
    await engine.aclose()
