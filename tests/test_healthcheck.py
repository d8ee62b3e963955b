"""The image's HEALTHCHECK (`python -m stream.healthcheck`) against a real server."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from pipeline.jobs import EngineStatus
from stream import healthcheck
from stream.app import create_app
from stream.settings import Settings
from tests.fakes import FakeEngine
from tests.servers import free_port, live_server


class WarmingEngine(FakeEngine):
    @property
    def status(self) -> EngineStatus:
        return "warming"


def point_at(monkeypatch: pytest.MonkeyPatch, base_url: str) -> None:
    address = urlsplit(base_url)
    monkeypatch.setenv("FLUXSTREAM_HOST", str(address.hostname))
    monkeypatch.setenv("FLUXSTREAM_PORT", str(address.port))


@pytest.fixture
def warming_server(settings: Settings) -> Iterator[str]:
    with live_server(create_app(settings, WarmingEngine())) as url:
        yield url


def test_a_ready_server_passes(fake_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    point_at(monkeypatch, fake_server)
    assert healthcheck.main() == 0


def test_a_warming_server_fails_and_says_it_is_warming(
    warming_server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Docker counts this failure as "starting" within the image's start period."""
    point_at(monkeypatch, warming_server)
    assert healthcheck.main() == 1
    assert capsys.readouterr().err.strip().endswith("/health answered 503 (warming)")


def test_no_server_fails_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLUXSTREAM_HOST", "127.0.0.1")
    monkeypatch.setenv("FLUXSTREAM_PORT", str(free_port()))
    assert healthcheck.main() == 1
    assert "Connection refused" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_a_server_on_every_interface_is_checked_through_loopback(host: str) -> None:
    url = healthcheck.health_url({"FLUXSTREAM_HOST": host, "FLUXSTREAM_PORT": "9000"})
    assert url == "http://127.0.0.1:9000/health"


def test_without_variables_it_checks_the_default_port() -> None:
    assert healthcheck.health_url({}) == "http://127.0.0.1:8000/health"
