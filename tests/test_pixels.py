"""Final images are quantised on the device, to the same bytes as diffusers' PIL output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from pipeline.pixels import to_pil_images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_quantisation_matches_diffusers_pil_output(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    decoded = torch.rand(2, 3, 64, 48, generator=generator) * 2.2 - 1.1  # VAE range, clipped
    # Exact half steps too, where the rounding rule shows.
    decoded[0, 0, 0, :8] = (torch.arange(8) + 0.5) / 255 * 2 - 1
    decoded = decoded.to(dtype)
    processor = VaeImageProcessor(vae_scale_factor=16)
    expected = processor.postprocess(decoded, output_type="pil")
    ours = to_pil_images(processor.postprocess(decoded, output_type="pt"))
    assert [image.size for image in ours] == [(48, 64), (48, 64)]
    for mine, theirs in zip(ours, expected, strict=True):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))
