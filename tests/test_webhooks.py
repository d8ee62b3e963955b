"""Webhook delivery: allow-listed hosts only, retries on transient answers, then gives up."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from stream.errors import InvalidRequest
from stream.webhooks import check_webhook_url, deliver
from tests.conftest import make_settings
from tests.servers import webhook_receiver


@pytest.mark.parametrize(
    ("statuses", "calls", "delivered"),
    [([200], 1, True), ([503, 502, 200], 3, True), ([500], 3, False), ([404], 1, False)],
)
async def test_delivery_retries_transient_failures_only(
    tmp_path: Path, statuses: list[int], calls: int, delivered: bool
) -> None:
    settings = make_settings(tmp_path, webhook_attempts=3, webhook_backoff_s=0.001)
    with webhook_receiver(statuses) as (url, deliveries):
        assert await deliver(url, "imgjob_1", {"id": "imgjob_1"}, settings) is delivered
    assert [delivery.json() for delivery in deliveries] == [{"id": "imgjob_1"}] * calls
    assert all("webhook-signature" not in delivery.headers for delivery in deliveries)


async def test_an_unreachable_host_is_given_up_after_the_attempts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, webhook_attempts=2, webhook_backoff_s=0.001)
    with webhook_receiver([200]) as (url, _):
        closed = url
    assert await deliver(closed, "imgjob_1", {}, settings) is False


# The example of the Standard Webhooks specification, whose libraries verify these headers.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.parametrize(
    ("secret", "key"),
    [(SPEC_SECRET, base64.b64decode(SPEC_SECRET[6:])), ("plain text secret", b"plain text secret")],
)
async def test_deliveries_are_signed_the_standard_webhooks_way(
    tmp_path: Path, secret: str, key: bytes
) -> None:
    settings = make_settings(
        tmp_path, webhook_secret=secret, webhook_attempts=2, webhook_backoff_s=0.001
    )
    with webhook_receiver([503, 200]) as (url, deliveries):
        assert await deliver(url, "imgjob_1", {"id": "imgjob_1", "status": "completed"}, settings)
    for delivery in deliveries:
        headers = delivery.headers
        assert headers["webhook-id"] == "imgjob_1"
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        signed = f"imgjob_1.{headers['webhook-timestamp']}.".encode() + delivery.body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        assert headers["webhook-signature"] == f"v1,{expected}"


def test_a_whsec_secret_that_is_not_base64_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="base64 after its prefix"):
        make_settings(tmp_path, webhook_secret="whsec_not base64!")


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost.evil.example/hook",
        "ftp://127.0.0.1/x",
        "http:///nohost",
        "127.0.0.1",
        "http://[::1",
        # Allowed hosts, but no client can send these: they failed only after the job ran.
        "http://127.0.0.1:notaport/hook",
        "http://127.0.0.1/\x00",
    ],
)
def test_only_http_urls_on_allowed_hosts_are_accepted(tmp_path: Path, url: str) -> None:
    settings = make_settings(tmp_path, webhook_allowed_hosts=("127.0.0.1",))
    assert check_webhook_url("https://127.0.0.1:9/hook", settings) == "https://127.0.0.1:9/hook"
    with pytest.raises(InvalidRequest) as raised:
        check_webhook_url(url, settings)
    assert raised.value.param == "webhook_url"
