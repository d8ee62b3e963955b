from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from stream.settings import Settings
from tests.fakes import FakeEngine
from tests.servers import live_server


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded-model cache for the whole run (built once, in about a second)."""
    return tmp_path_factory.mktemp("model-cache")


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path / "images", cache_dir=tmp_path / "cache", **overrides)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_server(settings: Settings, fake_engine: FakeEngine) -> Iterator[str]:
    from stream.app import create_app

    with live_server(create_app(settings, fake_engine)) as url:
        yield url


def sdk_client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
