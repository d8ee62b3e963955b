"""Arguments the official `openai` SDK's own signatures offer, sent as a user sends them, and
the typed fields it reads back: the SDK against a real server with the embedded model."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.servers import live_server

FAST = {"size": "64x64", "response_format": "b64_json", "extra_body": {"num_inference_steps": 2}}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    engine = ThreadedEngine(create_flux_runner(ModelSpec(cache_dir=model_cache)), max_queued=4)
    settings = make_settings(tmp_path_factory.mktemp("sdk-compat"))
    with live_server(create_app(settings, engine)) as url:
        yield sdk_client(url)


@pytest.mark.parametrize("quality", ["xhigh", "max"])
def test_every_quality_the_sdk_offers_is_served_at_the_full_step_count(
    client: openai.OpenAI, quality: str
) -> None:
    result = client.images.generate(prompt="a fox", quality=quality, **FAST)  # type: ignore[arg-type]
    assert result.quality == "high"
    assert result.data and result.data[0].b64_json
