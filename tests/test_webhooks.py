"""Webhook delivery: allow-listed hosts only, retries on transient answers, then gives up."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    with webhook_receiver(statuses) as (url, bodies):
        assert await deliver(url, {"id": "imgjob_1"}, settings) is delivered
    assert bodies == [{"id": "imgjob_1"}] * calls


async def test_an_unreachable_host_is_given_up_after_the_attempts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, webhook_attempts=2, webhook_backoff_s=0.001)
    with webhook_receiver([200]) as (url, _):
        closed = url
    assert await deliver(closed, {}, settings) is False


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
