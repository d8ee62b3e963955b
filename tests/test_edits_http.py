"""`POST /v1/images/edits` over HTTP with a scripted engine: the wire formats the SDKs use,
every bad input answered before any byte of the result, and what reaches the engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.fakes import FakeEngine
from tests.images import bomb_png, data_url, encoded, hole_mask, noise_image
from tests.servers import live_server

PNG = encoded(noise_image((128, 96)))

Files = list[tuple[str, tuple[str, bytes, str]]]


def post_form(base_url: str, files: Files, fields: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/images/edits",
        files=files,
        data={"prompt": "a cat", **(fields or {})},
        timeout=30,
    )


def part(name: str, data: bytes = PNG, media_type: str = "image/png") -> tuple[str, tuple]:
    return (name, ("input.png", data, media_type))


def error_of(response: httpx.Response, status: int = 400) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


def test_sdk_single_image_edit_reaches_the_engine_with_the_image_and_default_strength(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    result = sdk_client(fake_server).images.edit(
        image=("photo.png", PNG, "image/png"), prompt="a cat", response_format="b64_json"
    )
    (job,) = fake_engine.jobs
    assert job.edit is not None
    assert [image.size for image in job.edit.images] == [(128, 96)]
    assert job.edit.mask is None and job.edit.strength == 0.8
    assert result.size == "592x444"  # the input's 4:3 shape at its nearest tier, 0.5K
    assert result.usage is not None and result.usage.input_tokens_details is not None
    assert result.usage.input_tokens_details.image_tokens == (592 // 16) * (448 // 16)


def test_sdk_list_of_images_is_sent_as_image_brackets_and_accepted(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    sdk_client(fake_server).images.edit(image=[("a.png", PNG, "image/png")], prompt="a cat")
    (job,) = fake_engine.jobs
    assert job.edit is not None and len(job.edit.images) == 1


def test_sdk_streaming_edit_sends_image_edit_events(fake_server: str) -> None:
    events = list(
        sdk_client(fake_server).images.edit(
            image=("a.png", PNG, "image/png"), prompt="a cat", stream=True, partial_images=2
        )
    )
    assert [event.type for event in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]


def test_multipart_scalars_arrive_as_strings_and_are_coerced(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fields = {"n": "3", "strength": "0.35", "seed": "10", "size": "64x64", "stream": "false"}
    response = post_form(fake_server, [part("image")], fields)
    assert response.status_code == 200, response.text
    (job,) = fake_engine.jobs
    assert job.seeds == (10, 11, 12)
    assert job.edit is not None and job.edit.strength == 0.35
    assert (job.width, job.height) == (64, 64)


def test_stream_true_as_a_string_streams(fake_server: str) -> None:
    response = post_form(fake_server, [part("image")], {"stream": "true", "partial_images": "1"})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "event: image_edit.partial_image" in response.text
    assert "event: image_edit.completed" in response.text


def test_mask_makes_an_inpainting_job_with_full_strength_by_default(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    mask = encoded(hole_mask((128, 96), (10, 10, 50, 50)))
    response = post_form(fake_server, [part("image"), part("mask", mask)])
    assert response.status_code == 200, response.text
    (job,) = fake_engine.jobs
    assert job.edit is not None and job.edit.mask is not None
    assert job.edit.strength == 1.0
    assert job.edit.mask.getpixel((20, 20)) == 255 and job.edit.mask.getpixel((80, 80)) == 0


def test_octet_stream_jpeg_named_png_is_recognised_from_its_bytes(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    jpeg = encoded(noise_image((64, 64)), "JPEG")
    response = post_form(fake_server, [part("image", jpeg, "application/octet-stream")])
    assert response.status_code == 200, response.text
    assert fake_engine.jobs[0].edit is not None


def test_json_variant_with_data_urls(fake_server: str, fake_engine: FakeEngine) -> None:
    body = {
        "prompt": "a cat",
        "images": [{"image_url": data_url(PNG)}],
        "mask": {"image_url": data_url(encoded(hole_mask((128, 96), (0, 0, 8, 8))))},
        "strength": 0.5,
        "size": "128x96",
    }
    response = httpx.post(f"{fake_server}/v1/images/edits", json=body, timeout=30)
    assert response.status_code == 200, response.text
    (job,) = fake_engine.jobs
    assert job.edit is not None and job.edit.mask is not None and job.edit.strength == 0.5


@pytest.mark.parametrize(
    ("images", "param", "code"),
    [
        ([{"image_url": "https://example.com/cat.png"}], "images", "invalid_image_url"),
        ([{"file_id": "file-123"}], "images", None),
        ("data:image/png;base64,AAAA", "images", None),
        ([{"image_url": "data:image/png;base64,***"}], "images", "invalid_base64"),
    ],
)
def test_json_variant_refuses_remote_urls_file_ids_and_bad_shapes(
    fake_server: str, images: object, param: str, code: str | None
) -> None:
    body = {"prompt": "a cat", "images": images}
    error = error_of(httpx.post(f"{fake_server}/v1/images/edits", json=body, timeout=30))
    assert (error["param"], error["code"]) == (param, code)


def test_remote_url_refusal_says_the_server_fetches_nothing(fake_server: str) -> None:
    body = {"prompt": "a cat", "images": [{"image_url": "http://example.com/a.png"}]}
    error = error_of(httpx.post(f"{fake_server}/v1/images/edits", json=body, timeout=30))
    assert "does not fetch remote images" in str(error["message"])


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encoded(noise_image((16, 16)), "GIF"), "invalid_image_format"),
        (b"%PDF-1.4 not an image", "invalid_image_format"),
        (b"", "empty_image_file"),
        (PNG[: len(PNG) // 2], "invalid_image"),
        (bomb_png(20_000), "image_too_large"),
    ],
    ids=["gif", "pdf", "empty", "truncated", "bomb"],
)
def test_bad_image_is_a_400_with_its_openai_code_and_the_sdk_raises(
    fake_server: str, fake_engine: FakeEngine, data: bytes, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_client(fake_server).images.edit(image=("a.png", data, "image/png"), prompt="a cat")
    error = raised.value.response.json()["error"]
    assert (error["param"], error["code"]) == ("image", code)
    assert fake_engine.jobs == []


def test_mask_of_another_size_is_a_400_on_mask(fake_server: str) -> None:
    mask = encoded(hole_mask((64, 64), (0, 0, 8, 8)))
    error = error_of(post_form(fake_server, [part("image"), part("mask", mask)]))
    assert error["param"] == "mask"


def test_several_images_where_the_model_takes_one_is_a_400_saying_so(fake_server: str) -> None:
    error = error_of(post_form(fake_server, [part("image[]"), part("image[]")]))
    assert error["param"] == "image"
    assert "accepts 1 input image; got 2" in str(error["message"])


def test_repeated_image_parts_count_as_several_images(fake_server: str) -> None:
    error = error_of(post_form(fake_server, [part("image"), part("image")]))
    assert "got 2" in str(error["message"])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"strength": "1.5"}, "strength"),
        ({"strength": "much"}, "strength"),
        ({"n": "2", "stream": "true"}, "n"),
        ({"size": "huge"}, "size"),
    ],
)
def test_bad_scalar_fields_are_400_naming_their_param(
    fake_server: str, fields: dict[str, str], param: str
) -> None:
    assert error_of(post_form(fake_server, [part("image")], fields))["param"] == param


def test_missing_image_is_a_400_on_image(fake_server: str) -> None:
    response = httpx.post(
        f"{fake_server}/v1/images/edits",
        files={"prompt": (None, "a cat")},
        timeout=30,
    )
    assert error_of(response)["param"] == "image"


def test_missing_prompt_is_a_400_on_prompt(fake_server: str) -> None:
    response = httpx.post(f"{fake_server}/v1/images/edits", files=[part("image")], timeout=30)
    assert error_of(response)["param"] == "prompt"


@pytest.fixture
def small_limits_server(tmp_path: Path, fake_engine: FakeEngine) -> Iterator[str]:
    settings = make_settings(tmp_path, max_image_bytes=20_000, max_body_bytes=100_000)
    with live_server(create_app(settings, fake_engine)) as url:
        yield url


def test_file_over_the_byte_limit_is_a_413_image_file_too_large(small_limits_server: str) -> None:
    big = encoded(noise_image((128, 128)))
    assert 20_000 < len(big) < 100_000
    with pytest.raises(openai.APIStatusError) as raised:
        sdk_client(small_limits_server).images.edit(
            image=("a.png", big, "image/png"), prompt="a cat"
        )
    assert raised.value.status_code == 413
    error = raised.value.response.json()["error"]
    assert (error["param"], error["code"]) == ("image", "image_file_too_large")


def test_data_url_over_the_byte_limit_is_a_413(small_limits_server: str) -> None:
    big = encoded(noise_image((128, 128)))
    body = {"prompt": "a cat", "images": [{"image_url": data_url(big)}]}
    response = httpx.post(f"{small_limits_server}/v1/images/edits", json=body, timeout=30)
    assert error_of(response, 413)["code"] == "image_file_too_large"


def test_body_limit_counts_bytes_received_not_content_length(small_limits_server: str) -> None:
    """A chunked upload has no Content-Length; one that claims to be small must not pass."""
    boundary = "fluxstreamtest"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(40):
            yield b"\x00" * 10_000

    response = httpx.post(
        f"{small_limits_server}/v1/images/edits",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=30,
    )
    assert error_of(response, 413)["code"] == "request_too_large"


def test_json_body_that_is_not_an_object_is_a_400(fake_server: str) -> None:
    response = httpx.post(
        f"{fake_server}/v1/images/edits", content=json.dumps([1, 2]).encode(), timeout=30
    )
    assert error_of(response)["param"] is None


def test_edit_with_an_rgba_image_and_no_mask_is_an_img2img_job(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    response = post_form(fake_server, [part("image", encoded(rgba))])
    assert response.status_code == 200, response.text
    (job,) = fake_engine.jobs
    assert job.edit is not None and job.edit.mask is None
    assert job.edit.images[0].getpixel((0, 0)) == (255, 255, 255)
