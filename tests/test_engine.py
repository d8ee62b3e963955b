"""The threaded engine with a scripted runner: queueing, cancelling, failing."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from pipeline.engine import ThreadedEngine
from pipeline.jobs import (
    EngineClosed,
    Job,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    Progress,
    Queued,
    QueueFull,
    QueueTimeout,
    Result,
    Started,
)
from tests.fakes import StepRunner


def job(steps: int = 3) -> Job:
    return Job(
        prompt="x", width=16, height=16, seeds=(1,), num_inference_steps=steps, guidance_scale=1.0
    )


async def collect(engine: ThreadedEngine, the_job: Job) -> list[object]:
    return [event async for event in engine.submit(the_job).events()]


async def test_events_arrive_in_order_and_end_with_the_result() -> None:
    engine = ThreadedEngine(StepRunner(), max_queued=2)
    events = await collect(engine, job(3))
    assert events[:2] == [Queued(position=1, estimated_wait_s=5.0), Started(events[1].queue_wait_s)]
    assert events[2:5] == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
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


async def test_queued_jobs_hear_their_position_move_up_as_the_queue_shrinks() -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=3)
    engine.submit(job())
    await asyncio.sleep(0.05)
    second, third = engine.submit(job()), engine.submit(job())
    second.cancel()
    positions = []
    async for event in third.events():
        if isinstance(event, Queued):
            positions.append(event.position)
            if event.position == 1:
                break
    assert positions == [2, 1]
    release.set()
    await engine.aclose()


async def test_a_job_that_waits_too_long_in_the_queue_fails_and_frees_its_place() -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=1, max_queue_wait_s=0.05)
    engine.submit(job())
    await asyncio.sleep(0.05)
    waiting = engine.submit(job())
    with pytest.raises(QueueTimeout):
        [event async for event in waiting.events()]
    assert engine.load().queued == 0
    release.set()
    await engine.aclose()


async def test_a_job_that_runs_too_long_is_stopped_with_a_timeout() -> None:
    runner = StepRunner(step_delay_s=0.01)
    engine = ThreadedEngine(runner, max_queued=1, max_run_s=0.05)
    with pytest.raises(JobTimedOut):
        await collect(engine, job(steps=1000))
    assert runner.steps_run < 1000
    assert isinstance((await collect(engine, job(1)))[-1], Result)
    await engine.aclose()


async def test_close_with_grace_lets_accepted_jobs_finish_and_refuses_new_ones() -> None:
    engine = ThreadedEngine(StepRunner(step_delay_s=0.01), max_queued=2)
    running, queued = engine.submit(job(5)), engine.submit(job(5))
    closing = asyncio.create_task(engine.aclose(grace_s=30))
    await asyncio.sleep(0)
    with pytest.raises(EngineClosed):
        engine.submit(job())
    assert engine.status == "draining"
    assert isinstance([e async for e in running.events()][-1], Result)
    assert isinstance([e async for e in queued.events()][-1], Result)
    await closing


async def test_close_after_the_grace_stops_the_running_job_with_engine_closed() -> None:
    engine = ThreadedEngine(StepRunner(step_delay_s=0.01), max_queued=1)
    running = engine.submit(job(1000))
    await asyncio.sleep(0.05)
    await engine.aclose(grace_s=0.05)
    with pytest.raises(EngineClosed):
        [event async for event in running.events()]
