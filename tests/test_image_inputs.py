"""Decoding uploaded images and masks: formats from the bytes, limits, modes, orientation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stream.errors import InvalidRequest
from stream.image_inputs import as_rgb, decode_edit_inputs, decode_image, edit_mask
from tests.images import bomb_png, encoded, hole_mask, noise_image

LIMIT = 10_000_000


def error_of(data: bytes, max_pixels: int = LIMIT) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        decode_image(data, "image", max_pixels)
    assert raised.value.param == "image"
    return raised.value


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_recognised_from_their_bytes(image_format: str) -> None:
    decoded = decode_image(encoded(noise_image((40, 30)), image_format), "image", LIMIT)
    assert decoded.size == (40, 30)
    assert decoded.mode == "RGB"


@pytest.mark.parametrize("image_format", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_invalid_image_format(image_format: str) -> None:
    data = encoded(noise_image((8, 8)), image_format)
    assert error_of(data).code == "invalid_image_format"


def test_text_is_invalid_image_format() -> None:
    assert error_of(b"hello, not an image").code == "invalid_image_format"


def test_empty_file_is_empty_image_file() -> None:
    assert error_of(b"").code == "empty_image_file"


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_truncated_file_is_invalid_image(image_format: str) -> None:
    data = encoded(noise_image((64, 64)), image_format)
    assert error_of(data[: len(data) // 2]).code == "invalid_image"


def test_corrupt_header_is_invalid_image() -> None:
    data = bytearray(encoded(noise_image((16, 16))))
    data[12:30] = b"\x00" * 18
    assert error_of(bytes(data)).code == "invalid_image"


def test_decompression_bomb_is_refused_from_its_header_before_decoding() -> None:
    data = bomb_png(20_000)  # 400 megapixels in about 50 kB
    assert len(data) < 100_000
    error = error_of(data, max_pixels=50_000_000)
    assert error.code == "image_too_large"
    assert "50000000 pixels" in error.message


def test_image_over_the_pixel_limit_is_image_too_large() -> None:
    assert error_of(encoded(noise_image((100, 100))), max_pixels=9_999).code == "image_too_large"


def test_exif_orientation_is_applied() -> None:
    picture = noise_image((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    data = encoded(picture, "JPEG", exif=exif, quality=95)
    assert decode_image(data, "image", LIMIT).size == (20, 40)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA", "I;16", "1"])
def test_palette_grayscale_alpha_and_16_bit_images_become_rgb(mode: str) -> None:
    source = Image.new("RGB", (16, 16), (200, 200, 200))
    image = source.convert(mode) if mode != "I;16" else Image.new("I;16", (16, 16), 200 * 256)
    decoded = as_rgb(decode_image(encoded(image), "image", LIMIT))
    pixel = decoded.getpixel((8, 8))
    assert isinstance(pixel, tuple)
    red, green, blue = pixel
    assert decoded.mode == "RGB"
    assert red == green == blue >= 150  # light gray stays light gray (palettes round it)


def test_transparent_areas_become_white() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert as_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_mask_alpha_zero_becomes_the_white_repaint_area() -> None:
    mask = edit_mask(hole_mask((32, 32), (8, 8, 16, 16)), (32, 32))
    values = np.asarray(mask)
    assert mask.mode == "L"
    assert values[10, 10] == 255 and values[0, 0] == 0
    assert set(np.unique(values)) == {0, 255}


def test_half_transparent_mask_pixels_are_kept_only_alpha_zero_is_edited() -> None:
    mask = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert set(np.asarray(edit_mask(mask, (4, 4))).flatten()) == {0}


def test_mask_without_alpha_is_refused_on_mask() -> None:
    with pytest.raises(InvalidRequest) as raised:
        edit_mask(Image.new("RGB", (8, 8)), (8, 8))
    assert raised.value.param == "mask"
    assert "alpha" in raised.value.message


def test_mask_of_another_size_than_the_image_is_refused_on_mask() -> None:
    image = encoded(noise_image((64, 48)))
    mask = encoded(hole_mask((64, 64), (0, 0, 8, 8)))
    with pytest.raises(InvalidRequest) as raised:
        decode_edit_inputs([image], mask, max_images=1, max_pixels=LIMIT)
    assert raised.value.param == "mask"
    assert "64x64" in raised.value.message and "64x48" in raised.value.message


def test_more_images_than_the_model_accepts_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidRequest) as raised:
        decode_edit_inputs([b"not decoded", b"not decoded"], None, max_images=1, max_pixels=LIMIT)
    assert raised.value.param == "image"
    assert "accepts 1 input image; got 2" in raised.value.message


def test_decoded_inputs_carry_rgb_images_and_the_converted_mask() -> None:
    inputs = decode_edit_inputs(
        [encoded(noise_image((32, 16)))],
        encoded(hole_mask((32, 16), (0, 0, 4, 4))),
        max_images=1,
        max_pixels=LIMIT,
    )
    assert [image.mode for image in inputs.images] == ["RGB"]
    assert inputs.mask is not None and inputs.mask.getpixel((1, 1)) == 255
