"""Small input images for edit tests, encoded as a client would upload them."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def noise_image(size: tuple[int, int] = (128, 96), seed: int = 0) -> Image.Image:
    """A busy RGB picture: any change to a pixel shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def scene_image(size: tuple[int, int] = (128, 96)) -> Image.Image:
    """A picture from the embedded model's scene world, which its VAE reproduces well."""
    from pipeline.embedded import scenes

    scene = scenes.Scene("sky", (scenes.SceneObject("house", "red", "large", "left"),))
    return Image.fromarray((scenes.render(scene, *size) * 255).astype(np.uint8), mode="RGB")


def encoded(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def hole_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """An OpenAI mask: opaque everywhere except the transparent `box`, the area to edit."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def decode_b64(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit pictures, in dB (infinite when equal)."""
    error = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if error == 0 else float(10 * np.log10(255**2 / error))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def bomb_png(side: int) -> bytes:
    """A valid PNG of side x side black pixels that compresses to a few kilobytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + checksum

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    rows = zlib.compress(b"\x00" * ((side // 8 + 1) * side), 9)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
