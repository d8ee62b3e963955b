"""The middleware that Ray's proxy runs: a cut OpenAI stream still ends with `error`."""

from __future__ import annotations

import json

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stream.proxy_guard import OneRequestId, UnfinishedStreamGuard

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


def app_sending(*messages: Message) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for message in messages:
            await send(message)

    return app


async def run(
    app: ASGIApp, method: str = "POST", middleware: type = UnfinishedStreamGuard
) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(app)({"type": "http", "method": method}, receive, send)
    return sent


START = {"type": "http.response.start", "status": 200, "headers": SSE}
PARTIAL = {"type": "http.response.body", "body": b"event: x\n\n", "more_body": True}


async def test_a_stream_cut_short_ends_with_one_openai_error_frame() -> None:
    sent = await run(app_sending(START, PARTIAL))
    last = sent[-1]
    assert last["type"] == "http.response.body" and not last.get("more_body")
    event, data = last["body"].decode().strip().split("\n")
    assert event == "event: error"
    error = json.loads(data.removeprefix("data: "))["error"]
    assert error["code"] == "replica_failed" and error["type"] == "server_error"


@pytest.mark.parametrize(
    ("method", "messages"),
    [
        ("POST", [START, PARTIAL, {"type": "http.response.body", "body": b""}]),
        ("GET", [START, PARTIAL]),
        ("POST", [{"type": "http.response.start", "status": 200, "headers": []}, PARTIAL]),
    ],
)
async def test_finished_streams_job_streams_and_plain_responses_are_left_alone(
    method: str, messages: list[Message]
) -> None:
    assert await run(app_sending(*messages), method) == messages


async def test_the_proxys_second_request_id_header_is_dropped() -> None:
    ids = [
        (b"x-request-id", b"req-1"),
        (b"content-type", b"text/plain"),
        (b"X-Request-ID", b"req-1"),
    ]
    start = {"type": "http.response.start", "status": 200, "headers": ids}
    (sent, _) = await run(app_sending(start, PARTIAL), "GET", OneRequestId)
    assert sent["headers"] == ids[:2]
