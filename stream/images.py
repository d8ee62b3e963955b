"""Encode PIL images to the requested output format, off the event loop."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import anyio
import anyio.to_thread
from PIL import Image

from stream.png import encode_png

MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
}
DEFAULT_QUALITY = 90
# Encoder speed settings chosen by `bench/encode.py` at the same quality (1024², q90): WebP
# method 0 is 19 ms against 73 ms for Pillow's default 4, files 4 % larger; AVIF speed 10
# is 27 ms against 190 ms for speed 6, 1 % larger, the same PSNR.
WEBP_METHOD = 0
AVIF_SPEED = 10


def encode_image(image: Image.Image, output_format: str, quality: int | None = None) -> bytes:
    """Encode to `output_format`; `quality` (0-100, 100 best) applies to lossy formats."""
    buffer = io.BytesIO()
    quality = DEFAULT_QUALITY if quality is None else quality
    if output_format == "png":
        return encode_png(image)
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD)
    elif output_format == "avif":
        image.save(buffer, format="AVIF", quality=quality, speed=AVIF_SPEED)
    elif output_format == "gif":
        image.convert("RGB").quantize(colors=256).save(buffer, format="GIF")
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()


def fit_exact(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize the generated image (sides multiples of 16) to the exact requested size."""
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


async def encode_async(image: Image.Image, output_format: str, quality: int | None) -> bytes:
    return await anyio.to_thread.run_sync(encode_image, image, output_format, quality)


async def encode_all(
    images: Sequence[Image.Image],
    size: tuple[int, int],
    output_format: str,
    quality: int | None,
) -> list[bytes]:
    """Each image resized to `size` and encoded, in the order given.

    The images of one request (`n > 1`) are encoded at the same time, each in a worker
    thread: Pillow's encoders release the GIL while they compress, so on a machine with
    several cores they run side by side (fpng holds the GIL, but for about 3 ms an image;
    `python -m bench.encode` compares this with one after another). The resize runs in
    the thread too, off the event loop."""
    encoded = [b""] * len(images)

    async def encode_one(index: int, image: Image.Image) -> None:
        encoded[index] = await anyio.to_thread.run_sync(
            _fit_and_encode, image, size, output_format, quality
        )

    async with anyio.create_task_group() as group:
        for index, image in enumerate(images):
            group.start_soon(encode_one, index, image)
    return encoded


def _fit_and_encode(
    image: Image.Image, size: tuple[int, int], output_format: str, quality: int | None
) -> bytes:
    return encode_image(fit_exact(image, size), output_format, quality)


def to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
