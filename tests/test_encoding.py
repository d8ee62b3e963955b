"""How finished images become files: fpng or Pillow for PNG, the same pixels either way, and
the images of one request encoded in parallel without losing their order."""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from stream import images, png
from tests.conftest import sdk_client


def photo_like(mode: str = "RGB", size: tuple[int, int] = (257, 131)) -> Image.Image:
    """Smooth gradients with mild texture (what a generated image looks like to an encoder),
    at odd sides so that no encoder gets rows of a convenient length."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    texture = np.random.default_rng(0).normal(0, 6, (height, width, 4))
    channels = np.stack([200 * x, 120 + 100 * y, 80 * (x + y), 255 - 90 * y], axis=-1)
    pixels = np.clip(channels + texture, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_fpng_writes_the_pixels_pillow_writes(mode: str) -> None:
    pytest.importorskip("fpng")
    image = photo_like(mode)
    data = png.encode_png(image)
    assert data == png.fpng_png(image)  # the fast path was taken
    assert data != png.pillow_png(image)
    np.testing.assert_array_equal(pixels(data), pixels(png.pillow_png(image)))
    np.testing.assert_array_equal(pixels(data), np.asarray(image))


class FakeFpng:
    """Stands in for the fpng module: answers `result`, or raises it, and counts calls."""

    def __init__(self, result: bytes | Exception) -> None:
        self.result = result
        self.calls = 0

    def from_pil(self, image: Image.Image) -> bytes:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    "fpng",
    [None, FakeFpng(b""), FakeFpng(RuntimeError("encoder failed"))],
    ids=["not installed", "returns no PNG", "raises"],
)
def test_pillow_writes_the_png_when_fpng_is_missing_or_fails(
    monkeypatch: pytest.MonkeyPatch, fpng: FakeFpng | None
) -> None:
    monkeypatch.setattr(png, "fpng", fpng)
    image = photo_like()
    data = png.encode_png(image)
    assert data == png.pillow_png(image)
    np.testing.assert_array_equal(pixels(data), np.asarray(image))
    assert fpng is None or fpng.calls == 1


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16"])
def test_modes_fpng_cannot_write_go_to_pillow(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    fake = FakeFpng(RuntimeError("must not be called"))
    monkeypatch.setattr(png, "fpng", fake)
    image = photo_like(mode)
    data = png.encode_png(image)
    assert fake.calls == 0
    assert data == png.pillow_png(image)
    np.testing.assert_array_equal(pixels(data), np.asarray(image))


def shade(value: int) -> Image.Image:
    return Image.new("RGB", (32, 16), (value, 0, value))


def reversing_encoder(monkeypatch: pytest.MonkeyPatch, workers: int) -> list[int]:
    """Makes `images.encode_image` wait until `workers` encodes run at once (so it fails
    unless they run in parallel), then finish the images in decreasing order of their
    blue value at (0, 0), which increases with the index here. Returns those values in the
    order the encodes finished."""
    started = threading.Barrier(workers, timeout=10)
    seen: list[int] = []
    finished: list[int] = []
    encode = images.encode_image

    def first_last(image: Image.Image, *args: Any) -> bytes:
        blue = int(np.asarray(image)[0, 0, 2])
        seen.append(blue)
        started.wait()
        time.sleep(0.05 * sorted(seen, reverse=True).index(blue))
        data = encode(image, *args)
        finished.append(blue)
        return data

    monkeypatch.setattr(images, "encode_image", first_last)
    return finished


async def test_encode_all_runs_the_images_together_and_keeps_their_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = [0, 80, 160, 240]
    finished = reversing_encoder(monkeypatch, workers=len(values))
    encoded = await images.encode_all([shade(v) for v in values], (32, 16), "png", None)
    assert finished == values[::-1]
    assert [int(pixels(data)[0, 0, 2]) for data in encoded] == values


def test_data_keeps_the_order_of_the_seeds_when_later_images_encode_first(
    monkeypatch: pytest.MonkeyPatch, fake_server: str
) -> None:
    """The fake engine paints each image's blue channel with its seed (mod 256)."""
    finished = reversing_encoder(monkeypatch, workers=4)
    response = sdk_client(fake_server).images.generate(
        prompt="x", n=4, size="64x32", response_format="b64_json", extra_body={"seed": 200}
    )
    assert finished == [203, 202, 201, 200]
    assert response.data is not None
    blues = []
    for item in response.data:
        assert item.b64_json is not None
        blues.append(int(pixels(base64.b64decode(item.b64_json))[0, 0, 2]))
    assert blues == [200, 201, 202, 203]


@pytest.mark.parametrize(("output_format", "pillow_default"), [("webp", "WEBP"), ("avif", "AVIF")])
def test_fast_lossy_settings_keep_files_within_a_fifth_of_pillows_defaults(
    output_format: str, pillow_default: str
) -> None:
    """The speed settings `bench/encode.py` chose must not cost more than 1.2x in size."""
    image = photo_like(size=(512, 384))
    ours = images.encode_image(image, output_format)
    buffer = io.BytesIO()
    image.save(buffer, format=pillow_default, quality=images.DEFAULT_QUALITY)
    assert len(ours) <= 1.2 * len(buffer.getvalue())
    assert Image.open(io.BytesIO(ours)).size == image.size
