"""Arguments the official `openai` SDK's own signatures offer, sent as a user sends them, and
the typed fields it reads back: the SDK against a real server with the embedded model."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TypedDict

import openai
import pytest
from PIL import Image

from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.servers import live_server


class FastArguments(TypedDict):
    """What keeps each call small and quick, typed for the SDK's overloads."""

    size: str
    response_format: Literal["b64_json"]
    extra_body: dict[str, int]


FAST: FastArguments = {
    "size": "64x64",
    "response_format": "b64_json",
    "extra_body": {"num_inference_steps": 2},
}


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
    client: openai.OpenAI, quality: Literal["xhigh", "max"]
) -> None:
    result = client.images.generate(prompt="a fox", quality=quality, **FAST)
    assert result.quality == "high"
    assert result.data and result.data[0].b64_json


def test_safety_identifier_is_echoed_in_the_response_and_the_completed_event(
    client: openai.OpenAI,
) -> None:
    result = client.images.generate(prompt="a fox", safety_identifier="user-7", **FAST)
    assert result.safety_identifier == "user-7"
    assert "safety_identifier" not in (result.model_extra or {})["ignored_parameters"]
    events = list(
        client.images.edit(
            prompt="a fox",
            image=("photo.png", png(), "image/png"),
            safety_identifier="user-7",
            stream=True,
            size="64x64",
            extra_body={"num_inference_steps": 2},
        )
    )
    assert events[-1].type == "image_edit.completed"
    assert events[-1].safety_identifier == "user-7"


def test_the_deprecated_user_stands_in_for_a_missing_safety_identifier(
    client: openai.OpenAI,
) -> None:
    assert client.images.generate(prompt="a", user="u1", **FAST).safety_identifier == "u1"
    both = client.images.generate(prompt="a", user="u1", safety_identifier="s1", **FAST)
    assert both.safety_identifier == "s1"
    assert client.images.generate(prompt="a", **FAST).safety_identifier is None


def test_a_markup_file_is_refused_with_a_400_that_names_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(prompt="a fox", image=png(), markup=png(), **FAST)
    assert raised.value.param == "markup"
    assert "not supported" in raised.value.message


def test_models_list_names_each_model_once_served_model_first(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "flux.1-dev"
    assert len(ids) == len(set(ids))
