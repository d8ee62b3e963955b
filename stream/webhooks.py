"""Deliver a finished job to the `webhook_url` its creator gave: allow-listed hosts only.

The server makes outgoing requests on a client's behalf, so a webhook could be aimed at
internal services. Only hosts named in `webhook_allowed_hosts` are accepted (checked before
the job is queued, so a bad URL is a 400), redirects are never followed, and each attempt
has a timeout. Failures are retried with exponential backoff, then logged; they never
change the job's own status.

Deliveries follow Standard Webhooks (standardwebhooks.com): `webhook-id` (the same for each
attempt, so a receiver can drop repeats) and `webhook-timestamp`, and with
`webhook_secret` set, `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of
`{id}.{timestamp}.{body}`, which that project's libraries verify as they are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import anyio
import httpx

from stream.errors import InvalidRequest
from stream.settings import Settings

logger = logging.getLogger(__name__)
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def check_webhook_url(url: object, settings: Settings) -> str | None:
    """The URL if it may be called back, None if absent; a 400 otherwise."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise InvalidRequest("webhook_url must be a string", param="webhook_url")
    # Parsed by the client that will send it: a URL it cannot send (a bad port, a control
    # character) is refused now, not after the job, and the host checked is the one called.
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidRequest("webhook_url is not a valid URL", param="webhook_url") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise InvalidRequest("webhook_url must be an http or https URL", param="webhook_url")
    if parts.host.lower() not in {host.lower() for host in settings.webhook_allowed_hosts}:
        raise InvalidRequest(
            f"webhook_url host {parts.host!r} is not allowed on this server",
            param="webhook_url",
            code="webhook_host_not_allowed",
        )
    return url


def webhook_headers(message_id: str, body: bytes, key: bytes | None) -> dict[str, str]:
    """Made per attempt: receivers refuse old timestamps, so a retry is stamped anew."""
    timestamp = str(int(time.time()))
    headers = {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": timestamp,
    }
    if key is not None:
        signed = f"{message_id}.{timestamp}.".encode() + body
        signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        headers["webhook-signature"] = f"v1,{signature}"
    return headers


async def deliver(url: str, message_id: str, payload: dict[str, Any], settings: Settings) -> bool:
    """POST `payload` as JSON until a 2xx answer or the attempts run out."""
    timeout = httpx.Timeout(settings.webhook_timeout_s)
    key = settings.webhook_key
    body = json.dumps(payload).encode()
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        for attempt in range(settings.webhook_attempts):
            if attempt:
                await anyio.sleep(settings.webhook_backoff_s * 2 ** (attempt - 1))
            headers = webhook_headers(message_id, body, key)
            try:
                response = await client.post(url, content=body, headers=headers)
            except httpx.HTTPError as error:
                logger.warning("webhook attempt %d failed: %s", attempt + 1, type(error).__name__)
                continue
            if response.is_success:
                return True
            logger.warning("webhook attempt %d answered %d", attempt + 1, response.status_code)
            if response.status_code not in RETRY_STATUSES:
                return False
    return False
