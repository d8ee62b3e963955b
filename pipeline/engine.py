"""One worker thread owns the pipeline; jobs queue in front of it, events flow back.

A diffusers pipeline is not safe to call from two threads (the scheduler keeps state), and
one device runs one denoising loop at a time anyway, so every job runs on the same
dedicated thread. Events cross to the asyncio loop of the caller with
`loop.call_soon_threadsafe`, so the denoising loop never waits for the HTTP side.

Who cancels whom:
- the consumer stops iterating `events()` (client gone, send failed): the handle cancels
  itself; a queued job leaves the queue at once, a running one stops at its next step;
- `aclose(grace_s)` (shutdown): new jobs are refused at once; accepted jobs get
  `grace_s` seconds to finish; then queued jobs fail with `EngineClosed`, the running one
  stops at its next step with `EngineClosed`, and the worker thread is joined;
- the queue-wait limit: the waiting caller gives up, the ticket leaves the queue and
  fails with `QueueTimeout`; the run-time limit: the worker stops the job at its next
  step and fails it with `JobTimedOut`;
- the runner raises an `EngineError` (parameters rejected, every image flagged): the
  caller gets it as is;
- the runner raises anything else: the job fails with a `JobFailed` whose message is safe for users,
  the traceback goes to the log, and the worker takes the next job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

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

    def deliver(self, item: Event | EngineError) -> None:
        """Thread-safe: hand one event (or the final error) to the caller's loop."""
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)
        except RuntimeError:
            logger.debug("event loop closed; dropping %s", type(item).__name__)

    async def events(self) -> AsyncIterator[Event]:
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
                return QueueTimeout("the request waited too long in the queue")
            return await self._inbox.get()  # the worker took it at the deadline


class ThreadedEngine:
    """The `ImageEngine` of the design: a bounded queue in front of one worker thread."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_queued: int,
        warmup: Job | None = None,
        max_queue_wait_s: float | None = None,
        max_run_s: float | None = None,
    ) -> None:
        self._runner = runner
        self._warmup = warmup
        self._status: EngineStatus = "warming" if warmup is not None else "ok"
        self._max_queued = max_queued
        self._max_queue_wait_s = max_queue_wait_s
        self._max_run_s = max_run_s
        self._pending: collections.deque[_Ticket] = collections.deque()
        self._running: _Ticket | None = None
        self._condition = threading.Condition()
        self._accepting = True
        self._closing = False
        self._mean_job_s = 5.0
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
            return EngineLoad(queued=len(self._pending), running=int(self._running is not None))

    def submit(self, job: Job) -> _Ticket:
        ticket = _Ticket(self, job, asyncio.get_running_loop(), self._max_queue_wait_s)
        with self._condition:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if len(self._pending) >= self._max_queued:
                raise QueueFull(retry_after_s=self._estimated_wait_s(len(self._pending) + 1))
            self._pending.append(ticket)
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
            ticket.deliver(EngineClosed("the server is shutting down"))
        await asyncio.to_thread(self._thread.join)

    def _wait_until_idle(self, timeout_s: float) -> None:
        with self._condition:
            self._condition.wait_for(
                lambda: not self._pending and self._running is None, timeout=timeout_s
            )

    def _estimated_wait_s(self, position: int) -> float:
        return self._mean_job_s * position

    def _announce_position(self, ticket: _Ticket, position: int) -> None:
        ticket.deliver(Queued(position=position, estimated_wait_s=self._estimated_wait_s(position)))

    def _announce_positions(self) -> None:
        """Called with the lock held whenever the queue shrinks."""
        for position, ticket in enumerate(self._pending, start=1):
            self._announce_position(ticket, position)

    def _forget(self, ticket: _Ticket) -> None:
        """Drop a cancelled ticket from the queue so it frees its place at once."""
        if self._expire(ticket):
            ticket.deliver(JobCancelled("the job was cancelled"))

    def _expire(self, ticket: _Ticket) -> bool:
        """Remove `ticket` if it is still queued; False if the worker already took it."""
        with self._condition:
            if ticket not in self._pending:
                return False
            self._pending.remove(ticket)
            self._announce_positions()
            self._condition.notify_all()
            return True

    def _next_ticket(self) -> _Ticket | None:
        with self._condition:
            while not self._pending and not self._closing:
                self._condition.wait()
            if self._closing:
                return None
            self._running = self._pending.popleft()
            self._announce_positions()
            return self._running

    def _warm_up(self, job: Job) -> None:
        """One throw-away generation first, so that no user request pays for compilation
        or first-call allocations; jobs submitted meanwhile simply wait in the queue."""
        started = time.perf_counter()
        try:
            self._runner.run(job, lambda event: None, lambda: self._closing)
        except Exception:
            logger.exception("warm-up generation failed")
            self._status = "failed"
            return
        logger.info("warm-up took %.1f s", time.perf_counter() - started)
        self._status = "ok"

    def _work(self) -> None:
        if self._warmup is not None:
            self._warm_up(self._warmup)
        while (ticket := self._next_ticket()) is not None:
            started = time.monotonic()
            deadline = None if self._max_run_s is None else started + self._max_run_s

            def stop_requested(ticket: _Ticket = ticket, deadline: float | None = deadline) -> bool:
                over_time = deadline is not None and time.monotonic() > deadline
                return ticket.stop_requested() or self._closing or over_time

            ticket.deliver(Started(queue_wait_s=started - ticket.submitted_at))
            try:
                result = self._runner.run(ticket.job, ticket.deliver, stop_requested)
            except JobCancelled as cancelled:
                ticket.deliver(self._why_stopped(ticket, cancelled))
            except EngineError as refused:
                # Rejected parameters, all images flagged: the runner's own words.
                ticket.deliver(refused)
            except Exception:
                logger.exception("job failed")
                ticket.deliver(JobFailed("the image could not be generated"))
            else:
                ticket.deliver(result)
                elapsed = time.monotonic() - started
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
            finally:
                with self._condition:
                    self._running = None
                    self._condition.notify_all()

    def _why_stopped(self, ticket: _Ticket, cancelled: JobCancelled) -> EngineError:
        if ticket.stop_requested():
            return cancelled
        if self._closing:
            return EngineClosed("the server shut down before the image was finished")
        return JobTimedOut(f"the job ran longer than {self._max_run_s:g} s and was stopped")
