"""Encode PIL images to the requested output format, off the event loop."""

from __future__ import annotations

import base64
import io

import anyio.to_thread
from PIL import Image

MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
}
DEFAULT_QUALITY = 90


def encode_image(image: Image.Image, output_format: str, quality: int | None = None) -> bytes:
    """Encode to `output_format`; `quality` (0-100, 100 best) applies to lossy formats."""
    buffer = io.BytesIO()
    quality = DEFAULT_QUALITY if quality is None else quality
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    elif output_format == "avif":
        image.save(buffer, format="AVIF", quality=quality)
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


def to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
