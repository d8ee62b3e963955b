"""The error taxonomy of the HTTP side, and its one mapping to OpenAI-shaped responses.

    APIError                    any error a client may see; carries status and body fields
    ├── InvalidRequest          400 invalid_request_error (bad parameter; `param` names it)
    ├── AuthenticationFailed    401 authentication_error
    ├── NotFound                404 invalid_request_error (unknown model, route, file)
    ├── PayloadTooLarge         413 invalid_request_error
    ├── RateLimited             429 rate_limit_error, with Retry-After
    ├── ServiceUnavailable      503 server_error (shutting down, queue wait too long:
    │                           that one with Retry-After)
    └── ServerError             500 server_error (a bug or a failed job; message is generic)

Messages are written for users: never exception text, paths or object reprs.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse


class APIError(Exception):
    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error shape: all four keys are always present."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


def retry_after(seconds: float | None) -> dict[str, str]:
    """The headers that tell the OpenAI SDKs when to retry: whole seconds, at least one
    (also when the engine has no measured run times to estimate from yet)."""
    whole = max(1, math.ceil(seconds or 0))
    return {"Retry-After": str(whole), "retry-after-ms": str(whole * 1000)}


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(
        self, message: str, *, retry_after_s: float | None, code: str | None = None
    ) -> None:
        super().__init__(message, code=code, headers=retry_after(retry_after_s))


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"


class ServerError(APIError):
    status = 500
    type = "server_error"
