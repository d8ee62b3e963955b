from __future__ import annotations

import shutil
import subprocess
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


NODE_TESTS = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tests/node and the pinned `openai` package installed by npm."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the Node SDK test needs them")
    folder = tmp_path_factory.mktemp("node-sdk")
    for script in NODE_TESTS.iterdir():
        shutil.copy(script, folder / script.name)
    try:
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder,
            check=True,
            capture_output=True,
            timeout=240,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as failure:
        pytest.skip(f"npm install of the openai Node SDK failed (no registry?): {failure}")
    return folder
