"""One worker thread owns the pipeline; jobs queue in front of it, events flow back.

A diffusers pipeline is not safe to call from two threads (the scheduler keeps state), and
one device runs one denoising loop at a time anyway, so every job runs on the same
dedicated thread. Events cross to the asyncio loop of the caller with
`loop.call_soon_threadsafe`, so the denoising loop never waits for the HTTP side.

Who cancels whom:
- the consumer stops iterating `events()` (client gone, send failed): the handle cancels
  itself; a queued job leaves the queue at once, a running one stops at its next step;
- `aclose()` (shutdown): queued jobs fail with `EngineClosed`, the running one is
  cancelled, and the worker thread is joined;
- the runner raises an `EngineError` (cancelled, parameters rejected, every image flagged):
  the caller gets it as is;
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
    EngineStatus,
    Event,
    Job,
    JobCancelled,
    JobFailed,
    ModelProfile,
    QueueFull,
    Result,
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

    def __init__(self, engine: ThreadedEngine, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self._engine = engine
        self._loop = loop
        self._inbox: asyncio.Queue[Event | EngineError] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._finished = False

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
                item = await self._inbox.get()
                if isinstance(item, EngineError):
                    self._finished = True
                    raise item
                if isinstance(item, Result):
                    self._finished = True
                yield item
                if self._finished:
                    return
        finally:
            if not self._finished:
                self.cancel()


class ThreadedEngine:
    """The `ImageEngine` of the design: a bounded queue in front of one worker thread."""

    def __init__(self, runner: Runner, *, max_queued: int, warmup: Job | None = None) -> None:
        self._runner = runner
        self._warmup = warmup
        self._status: EngineStatus = "warming" if warmup is not None else "ok"
        self._max_queued = max_queued
        self._pending: collections.deque[_Ticket] = collections.deque()
        self._running: _Ticket | None = None
        self._condition = threading.Condition()
        self._closing = False
        self._mean_job_s = 5.0
        self._thread = threading.Thread(target=self._work, name="fluxstream-engine", daemon=True)
        self._thread.start()

    @property
    def profile(self) -> ModelProfile:
        return self._runner.profile

    @property
    def status(self) -> EngineStatus:
        return "closed" if self._closing else self._status

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> _Ticket:
        ticket = _Ticket(self, job, asyncio.get_running_loop())
        with self._condition:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._pending) >= self._max_queued:
                raise QueueFull(retry_after_s=self._estimated_wait_s())
            self._pending.append(ticket)
            self._condition.notify()
        return ticket

    async def aclose(self) -> None:
        with self._condition:
            self._closing = True
            abandoned = list(self._pending)
            self._pending.clear()
            running = self._running
            self._condition.notify_all()
        for ticket in abandoned:
            ticket.deliver(EngineClosed("the server is shutting down"))
        if running is not None:
            running.cancel()
        await asyncio.to_thread(self._thread.join)

    def _estimated_wait_s(self) -> float:
        return self._mean_job_s * (len(self._pending) + 1)

    def _forget(self, ticket: _Ticket) -> None:
        """Drop a cancelled ticket from the queue so it frees its place at once."""
        with self._condition:
            if ticket in self._pending:
                self._pending.remove(ticket)
                ticket.deliver(JobCancelled("the job was cancelled"))

    def _next_ticket(self) -> _Ticket | None:
        with self._condition:
            while not self._pending and not self._closing:
                self._condition.wait()
            if self._closing:
                return None
            self._running = self._pending.popleft()
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
            started = time.perf_counter()
            try:
                result = self._runner.run(ticket.job, ticket.deliver, ticket.stop_requested)
            except EngineError as refused:
                # Cancelled, rejected parameters, all images flagged: the runner's own words.
                ticket.deliver(refused)
            except Exception:
                logger.exception("job failed")
                ticket.deliver(JobFailed("the image could not be generated"))
            else:
                ticket.deliver(result)
                elapsed = time.perf_counter() - started
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
            finally:
                with self._condition:
                    self._running = None
