"""How results are answered, through the OpenAI SDK and raw HTTP against a scripted engine."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from pipeline.jobs import ContentFiltered, JobRejected, Progress
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.fakes import FakeEngine
from tests.servers import live_server

FORMATS = [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP"), ("gif", "GIF"), ("avif", "AVIF")]


def post(base_url: str, body: object) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=30)


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(("output_format", "pillow_format"), FORMATS)
def test_every_output_format_is_a_real_file_of_the_exact_size(
    fake_server: str, output_format: str, pillow_format: str
) -> None:
    client = sdk_client(fake_server)
    inline = client.images.generate(  # type: ignore[call-overload]
        prompt="x",
        size="100x60",
        response_format="b64_json",
        output_format=output_format,
    )
    assert inline.data is not None and inline.data[0].b64_json is not None
    image = opened(base64.b64decode(inline.data[0].b64_json))
    assert (image.format, image.size) == (pillow_format, (100, 60))
    linked = client.images.generate(prompt="x", size="100x60", output_format=output_format)  # type: ignore[call-overload]
    assert linked.data is not None and linked.data[0].url is not None
    download = httpx.get(linked.data[0].url)
    assert download.headers["content-type"] == f"image/{output_format}"
    assert opened(download.content).size == (100, 60)


def test_lower_output_quality_gives_a_smaller_jpeg(fake_server: str) -> None:
    sizes = []
    for quality in (10, 95):
        body = {
            "prompt": "x",
            "size": "128x128",
            "output_format": "jpeg",
            "response_format": "b64_json",
            "output_quality": quality,
            "seed": 3,  # the same picture both times: only the quality may differ
        }
        sizes.append(len(post(fake_server, body).json()["data"][0]["b64_json"]))
    assert sizes[0] < sizes[1]


def test_sync_mode_returns_a_data_uri_and_stores_nothing(
    fake_server: str, settings_dir: Path
) -> None:
    body = {"prompt": "x", "size": "64x64", "output_format": "webp", "sync_mode": True}
    url = post(fake_server, body).json()["data"][0]["url"]
    header, payload = url.split(",", 1)
    assert header == "data:image/webp;base64"
    assert opened(base64.b64decode(payload)).size == (64, 64)
    assert list(settings_dir.iterdir()) == []


@pytest.fixture
def settings_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def short_lived_server(tmp_path: Path) -> Iterator[str]:
    settings = make_settings(tmp_path, url_ttl_s=30, public_base_url="https://cdn.example/base")
    with live_server(create_app(settings, FakeEngine())) as url:
        yield url


def test_urls_use_the_public_base_and_expire_with_the_file_gone_from_disk(
    short_lived_server: str, tmp_path: Path
) -> None:
    url = post(short_lived_server, {"prompt": "x", "size": "64x64"}).json()["data"][0]["url"]
    assert url.startswith("https://cdn.example/base/v1/images/files/")
    name = url.rsplit("/", 1)[1]
    local = f"{short_lived_server}/v1/images/files/{name}"
    assert httpx.get(local).status_code == 200
    path = tmp_path / "images" / name
    old = time.time() - 31
    os.utime(path, (old, old))
    gone = httpx.get(local)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert not path.exists()


def test_unknown_parameters_are_listed_in_the_json_body(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    body = {"prompt": "x", "size": "64x64", "controlnets": ["a"], "negative_prompt": "blur"}
    response = post(fake_server, body).json()
    assert response["ignored_parameters"] == ["controlnets"]
    assert fake_engine.jobs[0].pipeline_kwargs == {"negative_prompt": "blur"}


def test_unknown_parameters_are_listed_in_the_completed_event(fake_server: str) -> None:
    events = list(
        sdk_client(fake_server).images.generate(
            prompt="x", size="64x64", stream=True, extra_body={"upscale": 2, "seed": 3}
        )
    )
    completed = events[-1]
    assert completed.type == "image_generation.completed"
    assert completed.model_extra["ignored_parameters"] == ["upscale"]  # type: ignore[index]
    assert completed.model_extra["acceleration"] == "none"  # type: ignore[index]


def test_response_echoes_resolved_quality_and_the_speedup_applied(fake_server: str) -> None:
    body = {"prompt": "x", "size": "64x64", "quality": "low", "background": "transparent"}
    response = post(fake_server, body).json()
    assert (response["quality"], response["background"]) == ("low", "opaque")
    assert response["speedup"] == "none"


def test_all_images_flagged_is_a_400_content_policy_violation(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.script = [Progress(1, 4), ContentFiltered("flagged")]
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_client(fake_server).images.generate(prompt="x", size="64x64")
    assert raised.value.code == "content_policy_violation"


def test_all_images_flagged_while_streaming_is_one_error_event(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.script = [Progress(1, 4), ContentFiltered("flagged")]
    body = {"prompt": "x", "size": "64x64", "stream": True}
    with httpx.stream("POST", f"{fake_server}/v1/images/generations", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    (error,) = [json.loads(line[5:])["error"] for line in lines]
    assert error["code"] == "content_policy_violation"


def test_a_job_the_pipeline_rejects_is_a_400_naming_the_passed_through_param(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.script = [JobRejected("the pipeline rejected the passed-through parameters x")]
    response = post(fake_server, {"prompt": "x", "size": "64x64", "negative_prompt": 3})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "negative_prompt"


def test_string_typed_fields_work_over_http(fake_server: str, fake_engine: FakeEngine) -> None:
    body = {"prompt": "x", "n": "2", "seed": "4", "size": "64x64", "response_format": "b64_json"}
    response = post(fake_server, {**body, "go_fast": "true", "output_quality": "50"})
    assert response.status_code == 200
    assert [item["seed"] for item in response.json()["data"]] == [4, 5]
    assert fake_engine.jobs[0].go_fast is True
