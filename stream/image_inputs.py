"""Decode uploaded images and masks safely, into what the model side expects.

The format is recognised from the bytes (parts often arrive as application/octet-stream),
and the pixel count is checked from the header before any pixel is decoded, so that a
small file that expands to gigabytes (a decompression bomb) is refused cheaply. EXIF
orientation is applied; palette, grayscale, 16-bit and alpha images all become RGB.

Masks follow OpenAI: pixels with alpha 0 mark the area to edit. They become diffusers'
convention here ("L", 255 = repaint), so that the model side needs no protocol knowledge.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import anyio.to_thread
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.jobs import EditInputs
from stream.errors import InvalidRequest
from stream.settings import Settings
from stream.uploads import EditUpload

FORMATS = "PNG, JPEG or WebP"
_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


async def decode_upload(upload: EditUpload, max_images: int, settings: Settings) -> EditInputs:
    """`decode_edit_inputs` off the event loop: large images take a while to decode."""
    decode = functools.partial(
        decode_edit_inputs,
        upload.images,
        upload.mask,
        max_images=max_images,
        max_pixels=settings.max_input_pixels,
    )
    return await anyio.to_thread.run_sync(decode)


def decode_edit_inputs(
    images: Sequence[bytes], mask: bytes | None, *, max_images: int, max_pixels: int
) -> EditInputs:
    """The edit's images as RGB and its mask in diffusers' convention; blocking (Pillow),
    so callers run it in a worker thread. The count is checked before anything is decoded."""
    if not images:
        raise InvalidRequest("missing required parameter: image", param="image")
    if len(images) > max_images:
        raise InvalidRequest(
            f"this model accepts {max_images} input image{'s' if max_images > 1 else ''}; "
            f"got {len(images)}",
            param="image",
        )
    decoded = tuple(as_rgb(decode_image(data, "image", max_pixels)) for data in images)
    if mask is None:
        return EditInputs(images=decoded)
    mask_image = edit_mask(decode_image(mask, "mask", max_pixels), decoded[0].size)
    return EditInputs(images=decoded, mask=mask_image)


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of PNG, JPEG and WebP files, from their signatures."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Decode one file, upright, in its own mode; every failure is a 400 naming `param`."""
    if not data:
        raise InvalidRequest(f"{param} is an empty file", param=param, code="empty_image_file")
    image_format = sniff_format(data)
    if image_format is None:
        raise InvalidRequest(
            f"{param} must be a {FORMATS} image", param=param, code="invalid_image_format"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
        _check_pixels(image.size, param, max_pixels)
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise _too_large(param, max_pixels) from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        raise InvalidRequest(
            f"{param} could not be decoded: the file is truncated or corrupt",
            param=param,
            code="invalid_image",
        ) from None


def as_rgb(image: Image.Image) -> Image.Image:
    """RGB for the model: transparent areas over white, 16-bit gray scaled to 8 bits."""
    if image.mode in _SIXTEEN_BIT:
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def edit_mask(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (alpha 0 = edit) as diffusers' ("L", 255 = repaint, 0 = keep)."""
    if not mask.has_transparency_data:
        raise InvalidRequest(
            "mask must have an alpha channel: its fully transparent pixels mark the area to edit",
            param="mask",
            code="invalid_image",
        )
    if mask.size != image_size:
        raise InvalidRequest(
            f"mask is {mask.width}x{mask.height} but the image is "
            f"{image_size[0]}x{image_size[1]}; they must be the same size",
            param="mask",
            code="invalid_image",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda value: 255 if value == 0 else 0)


def _check_pixels(size: tuple[int, int], param: str, max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise _too_large(param, max_pixels)


def _too_large(param: str, max_pixels: int) -> InvalidRequest:
    return InvalidRequest(
        f"{param} has more than {max_pixels} pixels, the most this server accepts",
        param=param,
        code="image_too_large",
    )
