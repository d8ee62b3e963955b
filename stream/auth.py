"""API keys: once any key is configured, every `/v1/*` request needs `Authorization: Bearer`.

A pure ASGI middleware rather than a per-route dependency, so that routes added later under
`/v1/` are protected without opting in. Two deliberate exceptions:
- `/v1/images/files/...`: result urls are unguessable capabilities, like OpenAI's signed
  result urls, so that an `<img src>` or a plain download works without a header;
- `OPTIONS` preflights, which browsers send without credentials (CORS answers them).
A browser's `EventSource` cannot send headers, so GET requests may instead carry the key
as `?api_key=<key>` (the demo page does so for job events only). A key in a url can end up
in proxy and access logs: clients that can send headers should.
`/health`, `/metrics`, `/openapi.json` and the demo page are outside `/v1/` and stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from stream.errors import AuthenticationFailed, error_response
from stream.settings import Settings

PROTECTED_PREFIX = "/v1/"
OPEN_PREFIXES = ("/v1/images/files/",)
QUERY_KEY_METHODS = ("GET", "HEAD")


def load_api_keys(settings: Settings) -> tuple[str, ...]:
    """Keys from settings plus those in `api_keys_file` (one per line, `#` comments)."""
    keys = [key.strip() for key in settings.api_keys]
    if settings.api_keys_file is not None:
        for line in settings.api_keys_file.read_text().splitlines():
            keys.append(line.split("#", 1)[0].strip())
    return tuple(key for key in keys if key)


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    """Compares against every key in constant time, so timing tells nothing about a key."""
    given = presented.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protects(scope):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        in_query = QueryParams(scope["query_string"]).get("api_key", "")
        if in_query and scope["method"] in QUERY_KEY_METHODS and key_matches(in_query, self.keys):
            await self.app(scope, receive, send)
            return
        message = (
            "incorrect API key provided"
            if token or in_query
            else "missing API key: send it as 'Authorization: Bearer <key>'"
        )
        error = AuthenticationFailed(
            message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await error_response(error)(scope, receive, send)

    def _protects(self, scope: Scope) -> bool:
        path: str = scope["path"]
        return (
            bool(self.keys)
            and scope["method"] != "OPTIONS"
            and (path.startswith(PROTECTED_PREFIX) or path == PROTECTED_PREFIX.rstrip("/"))
            and not path.startswith(OPEN_PREFIXES)
        )
