"""Preparing an edit's inputs for the pipeline: sizes, masks, and each mode's arguments."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.edits import PreparedEdit
from pipeline.jobs import EditInputs
from tests.images import noise_image, pixels


def halves(size: tuple[int, int]) -> Image.Image:
    """Red on the left half, blue on the right."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def test_input_of_the_job_size_is_used_pixel_for_pixel() -> None:
    picture = noise_image((64, 48))
    prepared = PreparedEdit.of(EditInputs(images=(picture,)), (64, 48))
    assert np.array_equal(pixels(prepared.image), pixels(picture))


def test_output_of_another_shape_crops_the_centre_instead_of_stretching() -> None:
    wide = Image.new("RGB", (128, 64), (0, 255, 0))
    wide.paste(halves((64, 64)), (32, 0))  # a square in the middle, green bars either side
    prepared = PreparedEdit.of(EditInputs(images=(wide,)), (32, 32))
    assert prepared.image.size == (32, 32)
    assert prepared.image.getpixel((4, 16)) == (255, 0, 0)
    assert prepared.image.getpixel((28, 16)) == (0, 0, 255)


def test_mask_is_scaled_with_the_image_and_stays_binary() -> None:
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 12, 48, 36))
    prepared = PreparedEdit.of(EditInputs(images=(noise_image((64, 48)),), mask=mask), (96, 72))
    assert prepared.mask is not None and prepared.mask.size == (96, 72)
    assert set(np.unique(np.asarray(prepared.mask))) == {0, 255}


def test_keep_unmasked_puts_the_input_back_outside_the_mask() -> None:
    picture = noise_image((32, 32))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    prepared = PreparedEdit.of(EditInputs(images=(picture,), mask=mask), (32, 32))
    result = pixels(prepared.keep_unmasked(Image.new("RGB", (32, 32), (1, 2, 3))))
    assert np.array_equal(result[:, 16:], pixels(picture)[:, 16:])
    assert (result[:, :16] == (1, 2, 3)).all()


def test_each_mode_gets_its_own_arguments() -> None:
    mask = Image.new("L", (32, 16), 255)
    img2img = PreparedEdit.of(EditInputs(images=(noise_image((32, 16)),), strength=0.3), (32, 16))
    inpaint = PreparedEdit.of(EditInputs(images=(img2img.image,), mask=mask), (32, 16))
    assert set(img2img.arguments(kontext=False, count=1)) == {"image", "strength"}
    assert img2img.arguments(kontext=False, count=1)["strength"] == 0.3
    assert set(inpaint.arguments(kontext=False, count=1)) == {"image", "mask_image", "strength"}
    kontext = img2img.arguments(kontext=True, count=1)
    assert kontext["max_area"] == 32 * 16 and kontext["_auto_resize"] is False
    assert "strength" not in kontext
    assert "strength" in inpaint.arguments(kontext=True, count=1)
