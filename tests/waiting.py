"""Waiting in tests for something another thread or process does, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = 30, poll_s: float = 0.005
) -> None:
    """Poll `condition` until it holds; fail naming `what` when `timeout_s` runs out, so a
    hang shows as a test failure that says what never happened."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)
