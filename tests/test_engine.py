"""The threaded engine with a scripted runner: queueing, cancelling, failing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
import weakref

import pytest

from pipeline.engine import ThreadedEngine
from pipeline.jobs import (
    EditInputs,
    EngineClosed,
    Job,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    Preview,
    Progress,
    Queued,
    QueueFull,
    QueueTimeout,
    Result,
    Started,
)
from tests.fakes import StepRunner, picture


def job(steps: int = 3) -> Job:
    return Job(
        prompt="x", width=16, height=16, seeds=(1,), num_inference_steps=steps, guidance_scale=1.0
    )


async def collect(engine: ThreadedEngine, the_job: Job) -> list[object]:
    return [event async for event in engine.submit(the_job).events()]


async def test_events_arrive_in_order_and_an_idle_engine_starts_the_job_unqueued() -> None:
    engine = ThreadedEngine(StepRunner(), max_queued=2)
    events = await collect(engine, job(3))
    assert isinstance(events[0], Started)  # no `Queued` first: nothing was ahead of it
    assert events[1:4] == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
    assert isinstance(events[-1], Result)
    await engine.aclose()


async def test_a_queued_jobs_wait_is_estimated_from_measured_run_times_only() -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=2)
    engine.submit(job())
    await asyncio.sleep(0.3)  # the worker holds it: the first measured run takes >= 0.3 s
    behind = engine.submit(job()).events()
    assert await anext(behind) == Queued(position=1, estimated_wait_s=None)
    release.set()
    assert isinstance([event async for event in behind][-1], Result)
    release.clear()
    engine.submit(job())
    await asyncio.sleep(0.05)
    queued = await anext(engine.submit(job()).events())
    assert isinstance(queued, Queued) and queued.estimated_wait_s is not None
    # 0.8 x the first run (>= 0.3 s) + 0.2 x the second; far from any made-up figure.
    assert 0.2 < queued.estimated_wait_s < 3
    release.set()
    await engine.aclose(grace_s=10)


async def test_full_queue_refuses_at_once_without_a_made_up_retry_estimate() -> None:
    release = threading.Event()
    engine = ThreadedEngine(StepRunner(release), max_queued=1)
    running = engine.submit(job())
    await asyncio.sleep(0.05)  # let the worker take it, so the queue is empty again
    engine.submit(job())
    with pytest.raises(QueueFull) as raised:
        engine.submit(job())
    assert raised.value.retry_after_s is None  # no job has finished to estimate from
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


async def test_a_finished_job_is_freed_with_its_handle_not_kept_by_the_worker() -> None:
    # An edit's input images and a result's images can be hundreds of MB: the idle worker
    # must not hold the last job until the next one arrives.
    engine = ThreadedEngine(StepRunner(), max_queued=2)
    handle = engine.submit(job())
    assert isinstance([event async for event in handle.events()][-1], Result)
    ticket = weakref.ref(handle)
    del handle
    for _ in range(100):
        gc.collect()
        if ticket() is None:
            break
        await asyncio.sleep(0.05)
    assert ticket() is None
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
    engine = ThreadedEngine(StepRunner(release), max_queued=2, warmup=(job(1),))
    assert engine.status == "warming"
    queued = engine.submit(job(1))  # requests during warm-up wait in the queue
    release.set()
    events = [event async for event in queued.events()]
    assert events[0] == Queued(position=1, estimated_wait_s=None)  # and are told so
    assert isinstance(events[-1], Result)
    assert engine.status == "ok"
    await engine.aclose()
    assert engine.status == "closed"


async def test_shutdown_during_warm_up_stops_it_without_reporting_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = StepRunner(step_delay_s=0.02)
    engine = ThreadedEngine(runner, max_queued=2, warmup=(job(1000),))
    while runner.steps_run == 0:
        await asyncio.sleep(0.01)
    await engine.aclose()
    assert runner.steps_run < 1000
    assert engine.status == "closed"
    assert [record.message for record in caplog.records if record.levelno >= logging.WARNING] == []


async def test_failed_warm_up_is_reported_as_failed_status() -> None:
    engine = ThreadedEngine(StepRunner(fail=True), max_queued=2, warmup=(job(1),))
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


async def queued_behind_a_held_job(
    engine: ThreadedEngine, release: threading.Event, *jobs: Job
) -> list[object]:
    """Submit `jobs` while the worker is held on a first job, so that they all wait in the
    queue together, then let the worker go; each job's events, or the error it ended with."""
    engine.submit(job(1))
    await asyncio.sleep(0.05)  # the worker holds the first job; the others queue behind it
    handles = [engine.submit(each) for each in jobs]
    release.set()
    outcomes: list[object] = []
    for handle in handles:
        try:
            outcomes.append([event async for event in handle.events()])
        except Exception as error:
            outcomes.append(error)
    return outcomes


def prompts_of_calls(runner: StepRunner) -> list[list[str]]:
    return [[each.prompt for each in call] for call in runner.calls[1:]]


async def test_compatible_queued_jobs_share_one_call_and_keep_their_own_events() -> None:
    release = threading.Event()
    runner = StepRunner(release)
    engine = ThreadedEngine(runner, max_queued=4, max_batch_size=4)
    first = dataclasses.replace(job(3), prompt="a", seeds=(1, 2), partial_images=1)
    second = dataclasses.replace(job(3), prompt="b", seeds=(7,), partial_images=2)
    a_events, b_events = await queued_behind_a_held_job(engine, release, first, second)
    assert prompts_of_calls(runner) == [["a", "b"]]
    for events, the_job in ((a_events, first), (b_events, second)):
        assert isinstance(events, list)
        assert sum(isinstance(event, Started) for event in events) == 1
        assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3]
        assert len([e for e in events if isinstance(e, Preview)]) == the_job.partial_images
        assert events[-1].seeds == the_job.seeds
        assert [image.tobytes() for image in events[-1].images] == [
            picture((16, 16), seed).tobytes() for seed in the_job.seeds
        ]
    await engine.aclose()


async def test_jobs_that_cannot_share_a_call_run_in_their_own() -> None:
    release = threading.Event()
    runner = StepRunner(release)
    engine = ThreadedEngine(runner, max_queued=16, max_batch_size=8)
    base = job(3)
    edit = EditInputs(images=(picture((16, 16), 1),))
    others = {
        "size": dataclasses.replace(base, width=32),
        "steps": dataclasses.replace(base, num_inference_steps=4),
        "guidance": dataclasses.replace(base, guidance_scale=2.0),
        "mode": dataclasses.replace(base, edit=edit),
        "keywords": dataclasses.replace(base, pipeline_kwargs={"true_cfg_scale": 2.0}),
        "accel": dataclasses.replace(base, acceleration="high"),
        "decoder": dataclasses.replace(base, preview_decoder="vae"),
    }
    queued = [dataclasses.replace(base, prompt="first")]
    queued += [dataclasses.replace(each, prompt=name) for name, each in others.items()]
    queued.append(dataclasses.replace(base, prompt="last", seeds=(5,), safety_check=True))
    await queued_behind_a_held_job(engine, release, *queued)
    # The last one shares the first one's call, ahead of the others; each other runs alone.
    assert prompts_of_calls(runner) == [["first", "last"], *([name] for name in others)]
    await engine.aclose()


async def test_a_call_never_holds_more_images_than_the_batch_size() -> None:
    release = threading.Event()
    runner = StepRunner(release)
    engine = ThreadedEngine(runner, max_queued=8, max_batch_size=3)
    sizes = [2, 2, 1, 1, 3, 1]
    jobs = [dataclasses.replace(job(1), prompt=str(i), seeds=(0,) * n) for i, n in enumerate(sizes)]
    await queued_behind_a_held_job(engine, release, *jobs)
    assert prompts_of_calls(runner) == [["0", "2"], ["1", "3"], ["4"], ["5"]]
    await engine.aclose()


async def test_batch_size_one_runs_every_job_alone_as_before() -> None:
    release = threading.Event()
    runner = StepRunner(release)
    engine = ThreadedEngine(runner, max_queued=4)
    outcomes = await queued_behind_a_held_job(engine, release, job(), job(), job())
    assert [len(call) for call in runner.calls] == [1, 1, 1, 1]
    assert all(isinstance(events[-1], Result) for events in outcomes)  # type: ignore[index]
    await engine.aclose()


async def test_a_job_cancelled_in_a_batch_ends_at_once_and_the_others_finish() -> None:
    runner = StepRunner(step_delay_s=0.01)
    engine = ThreadedEngine(runner, max_queued=4, max_batch_size=2)
    blocker = engine.submit(job(5))
    leaving, staying = engine.submit(job(100)), engine.submit(job(100))
    async with contextlib.aclosing(leaving.events()) as leaving_events:
        async for event in leaving_events:
            if isinstance(event, Progress):
                break  # the batch runs; the client of `leaving` goes away
    with pytest.raises(JobCancelled):
        [event async for event in leaving.events()]
    assert runner.steps_run < 5 + 100  # answered while its batch still runs
    events = [event async for event in staying.events()]
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, 101))
    assert isinstance(events[-1], Result)
    assert [len(call) for call in runner.calls] == [1, 2]
    assert isinstance([e async for e in blocker.events()][-1], Result)
    await engine.aclose()


async def test_a_batch_whose_jobs_are_all_cancelled_stops_at_its_next_step() -> None:
    runner = StepRunner(step_delay_s=0.01)
    engine = ThreadedEngine(runner, max_queued=4, max_batch_size=2)
    engine.submit(job(1))
    handles = [engine.submit(job(1000)), engine.submit(job(1000))]
    async with contextlib.aclosing(handles[0].events()) as events:
        async for event in events:
            if isinstance(event, Progress):
                break
    handles[1].cancel()
    steps_at_cancel = runner.steps_run
    await asyncio.sleep(0.3)
    assert runner.steps_run <= steps_at_cancel + 1
    assert isinstance((await collect(engine, job(1)))[-1], Result)
    await engine.aclose()


async def test_a_batch_that_runs_too_long_times_out_every_job_of_it() -> None:
    release = threading.Event()
    runner = StepRunner(release, step_delay_s=0.01)
    engine = ThreadedEngine(runner, max_queued=4, max_run_s=0.05, max_batch_size=2)
    outcomes = await queued_behind_a_held_job(engine, release, job(1000), job(1000))
    assert [type(outcome) for outcome in outcomes] == [JobTimedOut, JobTimedOut]
    assert [len(call) for call in runner.calls] == [1, 2]
    await engine.aclose()


def test_batching_needs_a_runner_that_can_run_batches() -> None:
    class SingleRunner:
        profile = StepRunner.profile

        def run(self, the_job: Job, emit: object, stop_requested: object) -> Result:
            raise AssertionError("never called")

    with pytest.raises(TypeError):
        ThreadedEngine(SingleRunner(), max_queued=1, max_batch_size=2)
