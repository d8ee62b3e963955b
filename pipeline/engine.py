"""One worker thread owns the pipeline; jobs queue in front of it, events flow back.

A diffusers pipeline is not safe to call from two threads (the scheduler keeps state), and
one device runs one denoising loop at a time anyway, so every job runs on the same
dedicated thread. Events cross to the asyncio loop of the caller with
`loop.call_soon_threadsafe`, so the denoising loop never waits for the HTTP side.

Who cancels whom:
- the consumer stops iterating `events()` (client gone, send failed): the handle cancels
  itself; a queued job leaves the queue at once, a running one gets its `JobCancelled` at
  once and its images are dropped, and the pipeline stops at its next step unless other
  jobs of its batch still want theirs;
- `aclose(grace_s)` (shutdown): new jobs are refused at once; accepted jobs get
  `grace_s` seconds to finish; then queued jobs fail with `EngineClosed`, the running one
  stops at its next step with `EngineClosed`, and the worker thread is joined;
- the queue-wait limit: the waiting caller gives up, the ticket leaves the queue and
  fails with `QueueTimeout`; the run-time limit: the worker stops the job (or batch) at
  its next step and fails it with `JobTimedOut`;
- the runner raises an `EngineError` (parameters rejected, every image flagged): the
  caller gets it as is;
- the runner raises anything else: the job fails with a `JobFailed` whose message is safe for users,
  the traceback goes to the log, and the worker takes the next job.

Batching: with `max_batch_size` above 1, the worker that takes a job also takes the queued
jobs that can share its pipeline call (`shares_call`), oldest first, up to
`max_batch_size` images in all, and runs them as one call. Each job keeps its own events,
seeds and result; a job skipped over because it cannot share the call waits at most one
batch longer. A batch of k jobs may run for k x `max_run_s` (each job's own allowance: a
batch never times out where its jobs run one by one would not), and when it is stopped
every job of it fails alike.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Protocol, runtime_checkable

from pipeline.jobs import (
    EngineClosed,
    EngineError,
    EngineLoad,
    EngineStatus,
    Event,
    Job,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    ModelProfile,
    Queued,
    QueueFull,
    QueueTimeout,
    Result,
    Started,
)

logger = logging.getLogger(__name__)

Emit = Callable[[Event], None]
StopRequested = Callable[[], bool]


class Runner(Protocol):
    """Runs one job to completion on the calling thread; knows nothing about queues."""

    @property
    def profile(self) -> ModelProfile: ...

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        """Run `job`, emitting progress and previews; raise `JobCancelled` when asked to stop."""
        ...


@runtime_checkable
class BatchRunner(Runner, Protocol):
    """A runner that can also run several jobs that share one call (see `shares_call`)."""

    def run_batch(
        self, jobs: Sequence[Job], emits: Sequence[Emit], stop_requested: StopRequested
    ) -> list[Result | EngineError]:
        """Run `jobs` as one pipeline call, emitting each job's events with its own emit;
        one outcome per job; raise `JobCancelled` when asked to stop."""
        ...


@runtime_checkable
class LoraRunner(Protocol):
    """A runner that keeps LoRAs loaded (see `pipeline.loras`)."""

    def loaded_loras(self) -> frozenset[str]: ...


def _call_shape(job: Job) -> Job:
    """`job` without what may differ between jobs of one call: per image, or per job."""
    return dataclasses.replace(job, prompt="", seeds=(), partial_images=0, safety_check=False)


def shares_call(first: Job, other: Job) -> bool:
    """Whether `other` may run in the same pipeline call as `first`: both text-to-image,
    without pipeline keywords (some, like `prompt_2`, are per prompt), and alike in
    everything but prompt, seeds, previews count and safety checking (so with the same
    LoRAs at the same scales)."""
    return (
        first.edit is None
        and not first.pipeline_kwargs
        and _call_shape(first) == _call_shape(other)
    )


class _Ticket:
    """A submitted job: the engine's side writes events, the caller's side reads them."""

    def __init__(
        self,
        engine: ThreadedEngine,
        job: Job,
        loop: asyncio.AbstractEventLoop,
        max_queue_wait_s: float | None,
    ) -> None:
        self.job = job
        self.submitted_at = time.monotonic()
        self._engine = engine
        self._loop = loop
        self._inbox: asyncio.Queue[Event | EngineError] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._answered = threading.Lock()
        self._finished = False
        self._started = False
        self._queue_deadline = None if max_queue_wait_s is None else loop.time() + max_queue_wait_s

    def cancel(self) -> None:
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        self._engine._forget(self)

    def stop_requested(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Deliver `event` unless the job was already answered (a cancelled job of a batch
        that goes on hears nothing more)."""
        if not self._answered.locked():
            self.deliver(event)

    def finish(self, outcome: Result | EngineError) -> None:
        """Deliver the job's one final outcome; later ones are dropped."""
        if self._answered.acquire(blocking=False):
            self.deliver(outcome)

    def deliver(self, item: Event | EngineError) -> None:
        """Thread-safe: hand one event (or the final error) to the caller's loop."""
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)
        except RuntimeError:
            logger.debug("event loop closed; dropping %s", type(item).__name__)

    async def events(self) -> AsyncGenerator[Event, None]:
        try:
            while True:
                item = await self._next_item()
                if isinstance(item, EngineError):
                    self._finished = True
                    raise item
                if isinstance(item, Started):
                    self._started = True
                if isinstance(item, Result):
                    self._finished = True
                yield item
                if self._finished:
                    return
        finally:
            if not self._finished:
                self.cancel()

    async def _next_item(self) -> Event | EngineError:
        """The next item; while queued, give up at the queue-wait deadline."""
        if self._started or self._queue_deadline is None:
            return await self._inbox.get()
        try:
            return await asyncio.wait_for(
                self._inbox.get(), max(0.0, self._queue_deadline - self._loop.time())
            )
        except TimeoutError:
            self._queue_deadline = None
            if self._engine._expire(self):
                return QueueTimeout(
                    "the request waited too long in the queue",
                    retry_after_s=self._engine._estimated_wait_s(self._engine.queued + 1),
                )
            return await self._inbox.get()  # the worker took it at the deadline


class ThreadedEngine:
    """The `ImageEngine` of the design: a bounded queue in front of one worker thread."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_queued: int,
        warmup: Sequence[Job] = (),
        max_queue_wait_s: float | None = None,
        max_run_s: float | None = None,
        max_batch_size: int = 1,
    ) -> None:
        if max_batch_size > 1 and not isinstance(runner, BatchRunner):
            raise TypeError("max_batch_size above 1 needs a runner with run_batch")
        self._runner = runner
        self._warmup = warmup
        self._status: EngineStatus = "warming" if warmup else "ok"
        self._max_queued = max_queued
        self._max_queue_wait_s = max_queue_wait_s
        self._max_run_s = max_run_s
        self._max_batch_size = max_batch_size
        self._pending: collections.deque[_Ticket] = collections.deque()
        self._running: list[_Ticket] = []
        self._condition = threading.Condition()
        self._accepting = True
        self._closing = False
        # Measured only: no estimate is better than a made-up one.
        self._mean_job_s: float | None = None
        self._thread = threading.Thread(target=self._work, name="fluxstream-engine", daemon=True)
        self._thread.start()

    @property
    def profile(self) -> ModelProfile:
        return self._runner.profile

    @property
    def status(self) -> EngineStatus:
        if self._closing:
            return "closed"
        return self._status if self._accepting else "draining"

    @property
    def queued(self) -> int:
        return len(self._pending)

    def load(self) -> EngineLoad:
        with self._condition:
            return EngineLoad(queued=len(self._pending), running=len(self._running))

    def loaded_loras(self) -> frozenset[str]:
        if isinstance(self._runner, LoraRunner):
            return self._runner.loaded_loras()
        return frozenset()

    def submit(self, job: Job) -> _Ticket:
        ticket = _Ticket(self, job, asyncio.get_running_loop(), self._max_queue_wait_s)
        with self._condition:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if len(self._pending) >= self._max_queued:
                raise QueueFull(retry_after_s=self._estimated_wait_s(len(self._pending) + 1))
            # An idle worker takes the job at once: telling its client it is queued, with a
            # wait, would be false.
            busy = bool(self._pending or self._running) or self._status == "warming"
            self._pending.append(ticket)
            if busy:
                self._announce_position(ticket, len(self._pending))
            self._condition.notify_all()
        return ticket

    async def aclose(self, grace_s: float = 0.0) -> None:
        with self._condition:
            self._accepting = False
        if grace_s > 0:
            await asyncio.to_thread(self._wait_until_idle, grace_s)
        with self._condition:
            self._closing = True
            abandoned = list(self._pending)
            self._pending.clear()
            self._condition.notify_all()
        for ticket in abandoned:
            ticket.finish(EngineClosed("the server is shutting down"))
        await asyncio.to_thread(self._thread.join)

    def _wait_until_idle(self, timeout_s: float) -> None:
        with self._condition:
            self._condition.wait_for(
                lambda: not self._pending and not self._running, timeout=timeout_s
            )

    def _estimated_wait_s(self, position: int) -> float | None:
        """How long a job at `position` may wait, from measured run times; None before
        any job has finished."""
        return None if self._mean_job_s is None else self._mean_job_s * position

    def _announce_position(self, ticket: _Ticket, position: int) -> None:
        ticket.deliver(Queued(position=position, estimated_wait_s=self._estimated_wait_s(position)))

    def _announce_positions(self) -> None:
        """Called with the lock held whenever the queue shrinks."""
        for position, ticket in enumerate(self._pending, start=1):
            self._announce_position(ticket, position)

    def _forget(self, ticket: _Ticket) -> None:
        """Answer a cancelled ticket at once: queued, it frees its place; running, its
        images will be dropped (the runner stops when no job of the call is wanted)."""
        with self._condition:
            dropped = self._expire(ticket) or ticket in self._running
        if dropped:
            ticket.finish(JobCancelled("the job was cancelled"))

    def _expire(self, ticket: _Ticket) -> bool:
        """Remove `ticket` if it is still queued; False if the worker already took it."""
        with self._condition:
            if ticket not in self._pending:
                return False
            self._pending.remove(ticket)
            self._announce_positions()
            self._condition.notify_all()
            return True

    def _next_batch(self) -> list[_Ticket]:
        """The oldest queued job and the queued jobs that share its call; empty on close."""
        with self._condition:
            while not self._pending and not self._closing:
                self._condition.wait()
            if self._closing:
                return []
            first = self._pending.popleft()
            batch = [first, *self._companions(first)]
            for ticket in batch[1:]:
                self._pending.remove(ticket)
            self._running = batch
            self._announce_positions()
            return batch

    def _companions(self, first: _Ticket) -> list[_Ticket]:
        """Queued tickets that can join `first`'s call, oldest first, while images fit."""
        room = self._max_batch_size - first.job.num_images
        taken = []
        for ticket in self._pending:
            if ticket.job.num_images <= room and shares_call(first.job, ticket.job):
                taken.append(ticket)
                room -= ticket.job.num_images
        return taken

    def _warm_up(self, jobs: Sequence[Job]) -> None:
        """Throw-away generations first, so that no user request pays for compilation
        or first-call allocations; jobs submitted meanwhile simply wait in the queue."""
        started = time.perf_counter()
        try:
            for job in jobs:
                self._runner.run(job, lambda event: None, lambda: self._closing)
        except JobCancelled:
            return  # stopped by shutdown: nothing failed, and `status` says closed
        except Exception:
            logger.exception("warm-up generation failed")
            self._status = "failed"
            return
        logger.info("warm-up took %.1f s", time.perf_counter() - started)
        self._status = "ok"

    def _work(self) -> None:
        if self._warmup:
            self._warm_up(self._warmup)
        while self._run_next():
            pass

    def _run_next(self) -> bool:
        """Run the next batch; False once the engine closes. The batch is referenced only
        here and in `_running`, so that a finished job's inputs and images are freed with
        its handle rather than held by the idle worker until the next job."""
        batch = self._next_batch()
        if not batch:
            return False
        try:
            self._run(batch)
        finally:
            with self._condition:
                self._running = []
                self._condition.notify_all()
        return True

    def _run(self, batch: list[_Ticket]) -> None:
        """Run one pipeline call for `batch` and answer each of its jobs."""
        started = time.monotonic()
        allowed = None if self._max_run_s is None else self._max_run_s * len(batch)

        def stop_requested() -> bool:
            over_time = allowed is not None and time.monotonic() - started > allowed
            wanted = any(not ticket.stop_requested() for ticket in batch)
            return not wanted or self._closing or over_time

        for ticket in batch:
            ticket.emit(Started(queue_wait_s=started - ticket.submitted_at))
        outcomes: Sequence[Result | EngineError]
        try:
            outcomes = self._call(batch, stop_requested)
        except JobCancelled as cancelled:
            outcomes = [self._why_stopped(ticket, cancelled) for ticket in batch]
        except EngineError as refused:
            # Rejected parameters, all images flagged: the runner's own words.
            outcomes = [refused] * len(batch)
        except Exception:
            logger.exception("job failed")
            outcomes = [JobFailed("the image could not be generated")] * len(batch)
        else:
            elapsed_per_job = (time.monotonic() - started) / len(batch)
            mean = self._mean_job_s
            self._mean_job_s = (
                elapsed_per_job if mean is None else 0.8 * mean + 0.2 * elapsed_per_job
            )
        for ticket, outcome in zip(batch, outcomes, strict=True):
            ticket.finish(outcome)

    def _call(
        self, batch: list[_Ticket], stop_requested: StopRequested
    ) -> Sequence[Result | EngineError]:
        if len(batch) == 1:
            return [self._runner.run(batch[0].job, batch[0].emit, stop_requested)]
        assert isinstance(self._runner, BatchRunner)  # checked in __init__
        jobs = [ticket.job for ticket in batch]
        return self._runner.run_batch(jobs, [ticket.emit for ticket in batch], stop_requested)

    def _why_stopped(self, ticket: _Ticket, cancelled: JobCancelled) -> EngineError:
        if ticket.stop_requested():
            return cancelled
        if self._closing:
            return EngineClosed("the server shut down before the image was finished")
        return JobTimedOut(f"the job ran longer than {self._max_run_s:g} s and was stopped")
