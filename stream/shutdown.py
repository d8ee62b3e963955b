"""Graceful shutdown: on SIGTERM (or Ctrl+C), drain the engine before uvicorn stops.

Left alone, uvicorn closes its listening socket and waits for open connections, and
sse-starlette (which patches `uvicorn.Server.handle_exit`) cancels every stream at once:
running jobs die mid-way and streams end without saying why. So the first signal starts a
drain instead, and only when it is done does uvicorn's own shutdown begin:
1. the engine stops admitting: new requests get 503 and `/health` answers 503 `draining`
   (the socket stays open meanwhile, so clients hear 503 rather than "connection refused");
2. accepted jobs get `shutdown_grace_s` seconds to finish; their streams end normally;
3. what is left is stopped at its next step: its stream gets one `error` frame
   (`code: shutdown`), a plain request a 503;
4. the answers in flight are let finish (`InFlight`): a job's last result is encoded,
   stored and sent after the engine is done with it, by a request or a job's follower;
5. uvicorn's shutdown: the streams have ended, connections close, the lifespan joins the
   engine thread, and the process exits. A second signal skips what is left of the drain.
Url results are written to a temporary name and renamed (`stream.store`), so a shutdown at
any point leaves no partial file under a served name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import FrameType

import anyio
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Runs in the signal handler, on the thread that runs the event loop."""
        if self._draining is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        loop = asyncio.get_running_loop()
        # call_soon_threadsafe also wakes the loop's selector, which a signal may not.
        loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is None:
            logger.info("draining: no new jobs; waiting for accepted jobs to finish")
            self._draining = asyncio.get_running_loop().create_task(
                self._drain_then_exit(sig, frame)
            )

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        try:
            await self._drain()
        finally:
            super().handle_exit(sig, frame)


class InFlight:
    """Counts the work that still answers a client: HTTP requests (streams included) and
    the jobs API's followers, which encode and record a result after the engine is done."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self._count += 1
        if self._count == 1:
            self._idle = anyio.Event()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Whether everything in flight ended within `timeout_s`."""
        with anyio.move_on_after(timeout_s):
            await self._idle.wait()
        return self._count == 0


class InFlightMiddleware:
    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        async with self.in_flight.track():
            await self.app(scope, receive, send)
