"""Server-Sent Events exactly as the official OpenAI SDKs parse them.

Deliberate choices (see ../shared/protocol.md):
- every frame is `event: <type>` + one `data: <json>` line, the event name equal to the
  JSON `type`; lines end with a bare `\\n`;
- no `id:` lines ever on the OpenAI streams: after one, the Python SDK turns later blank
  lines into empty events. Only `job_frame`, for the browser-only jobs event stream,
  carries ids, so that `EventSource` can resume with `Last-Event-ID`;
- keep-alives are SSE comments (`: ping`), never events with empty data;
- a failure after the stream started is one `error` frame, then the body ends.

Who cancels whom: sse-starlette runs the event generator, the keep-alive pinger and a
disconnect listener in one task group. When the client goes away, the group cancels the
generator; the generator's `async for` over the engine's events is closed, and the job
handle cancels its job (queued: dropped; running: stopped at the next step).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

SEPARATOR = "\n"
# A frame as it goes on the wire.
Frame = bytes


def _frame(event: str, data: str, event_id: int | None = None) -> Frame:
    """Written here, not by sse-starlette's `ServerSentEvent`, whose encoder splits the data
    on line breaks and copies it three times: 15 ms for the completed event of a 1024² PNG.
    Our data is compact JSON, one line by construction (`json.dumps` escapes line breaks),
    so a frame is one concatenation."""
    head = "" if event_id is None else f"id: {event_id}{SEPARATOR}"
    return f"{head}event: {event}{SEPARATOR}data: {data}{SEPARATOR}{SEPARATOR}".encode()


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


def event_frame(payload: dict[str, Any]) -> Frame:
    """One OpenAI event; `payload["type"]` is also the SSE event name."""
    return _frame(payload["type"], _json(payload))


def job_frame(event_id: int, name: str, payload: dict[str, Any]) -> Frame:
    """One event of `GET /v1/images/jobs/{id}/events` (browsers only: it has an `id:`).

    Failures are named `failed` or `cancelled`, never `error`: an `EventSource` reports its
    own connection errors as `error` events, and the two must not be confused."""
    return _frame(name, _json(payload), event_id)


def error_frame(message: str, code: str | None = None, type: str = "server_error") -> Frame:
    return event_frame(
        {
            "type": "error",
            "error": {"message": message, "type": type, "param": None, "code": code},
        }
    )


def comment(text: str) -> Frame:
    return f": {text}{SEPARATOR}{SEPARATOR}".encode()


def event_stream(
    frames: AsyncIterator[Frame], *, keepalive_s: float, headers: dict[str, str]
) -> EventSourceResponse:
    return EventSourceResponse(
        frames,
        sep=SEPARATOR,
        ping=keepalive_s,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SEPARATOR),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )
