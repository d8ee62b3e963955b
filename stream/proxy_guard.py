"""Inside Ray's HTTP proxy: an OpenAI stream whose replica died still ends with an `error`.

When a replica process dies mid-stream, Ray's proxy stops relaying and the connection is
cut, and SDK users see a bare connection error. This ASGI middleware runs in the proxy
(Ray loads it through `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, which `stream.cluster`
sets, and deploy/serve.yaml through its `controller_options`): when a streamed POST
response ends without its final body message, it sends one OpenAI `error` frame and ends
the body properly, as the server itself does for failures after the stream started. Job
event streams (GET) are left alone: browsers reconnect and resume them on another replica.

The proxy also appends its own `x-request-id` to the one the app sent (the same id: the
proxy passed it on), which clients would read joined as "id, id"; `OneRequestId` keeps one.
"""

from __future__ import annotations

import contextlib

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stream.sse import error_frame

REQUEST_ID = b"x-request-id"
REPLICA_LOST = error_frame(
    "the server replica running this request stopped; retry the request",
    code="replica_failed",
)


class UnfinishedStreamGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        streaming = finished = False

        async def watched_send(message: Message) -> None:
            nonlocal streaming, finished
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            if streaming and not finished:
                with contextlib.suppress(OSError, RuntimeError):
                    await send({"type": "http.response.body", "body": REPLICA_LOST})


class OneRequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_one_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                ids = [i for i, (name, _) in enumerate(headers) if name.lower() == REQUEST_ID]
                message = {
                    **message,
                    "headers": [h for i, h in enumerate(headers) if i not in ids[1:]],
                }
            await send(message)

        await self.app(scope, receive, send_one_id)


def proxy_middlewares() -> list[Middleware]:
    """What Ray's proxy calls (by import path) for the middlewares it wraps itself in."""
    return [Middleware(UnfinishedStreamGuard), Middleware(OneRequestId)]
