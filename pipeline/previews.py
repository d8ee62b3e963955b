"""Latents to small RGB previews, cheaply enough to run inside the denoising loop.

The default decoder is a linear map from FLUX's 16 latent channels to RGB (3x16 + bias),
fitted once per model by least squares against the model's own VAE. Previews show the
predicted clean image x0 = x_t - sigma_t * v_t (flow matching), not the noisy latent, so
the first preview already looks like the picture that is forming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from PIL import Image


def preview_steps(total_steps: int, partial_images: int) -> tuple[int, ...]:
    """The 1-based steps after which previews are taken: evenly spread, distinct, and never
    the last step (the final image is sent as itself, not as a preview)."""
    count = min(partial_images, max(total_steps - 1, 0))
    return tuple(round((j + 1) * total_steps / (count + 1)) for j in range(count))


@dataclass(frozen=True)
class LinearPreviewDecoder:
    """RGB in [0, 1] = weight @ latent + bias, per latent pixel (pipeline-space latents)."""

    weight: torch.Tensor  # (3, 16)
    bias: torch.Tensor  # (3,)

    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """Map one unpacked latent (16, h, w) to an RGB image of `size` (width, height)."""
        latents = latents.detach().to(device="cpu", dtype=torch.float32)
        rgb = torch.einsum("oc,chw->ohw", self.weight, latents) + self.bias[:, None, None]
        pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(pixels, mode="RGB").resize(size, Image.Resampling.BILINEAR)


def _synthetic_images(count: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1]: varied enough to span the VAE's colour space."""
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    fine = torch.rand(count, 3, 16, 16, generator=generator) * 0.6 - 0.3
    images = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic")
    images = images + torch.nn.functional.interpolate(fine, size=(side, side), mode="bilinear")
    return images.clamp(-1, 1)


@torch.no_grad()
def fit_linear_decoder(
    vae: AutoencoderKL, samples: int = 8, side: int = 128
) -> LinearPreviewDecoder:
    """Fit the 16->3 map on pairs (latent pixel, VAE-decoded colour averaged over its patch)."""
    device, dtype = vae.device, vae.dtype
    scale = vae.config.scaling_factor
    shift = vae.config.shift_factor or 0.0
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    images = _synthetic_images(samples, side, torch.Generator().manual_seed(0))
    latents = vae.encode(images.to(device, dtype)).latent_dist.mean
    decoded = vae.decode(latents, return_dict=False)[0].float().cpu()
    target = torch.nn.functional.avg_pool2d((decoded + 1) / 2, factor)  # (n, 3, h, w) in [0, 1]
    source = ((latents.float().cpu() - shift) * scale).permute(0, 2, 3, 1).reshape(-1, 16)
    design = torch.cat([source, torch.ones(len(source), 1)], dim=1)
    solution = torch.linalg.lstsq(design, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return LinearPreviewDecoder(weight=solution[:16].T.contiguous(), bias=solution[16].contiguous())


@dataclass
class StepObservation:
    """What the scheduler saw at the last step: enough to reconstruct x0."""

    sample: torch.Tensor
    velocity: torch.Tensor
    sigma: float

    def predicted_clean(self) -> torch.Tensor:
        return self.sample - self.sigma * self.velocity


@contextmanager
def observe_scheduler_steps(
    scheduler: object, on_step: Callable[[StepObservation], None]
) -> Iterator[None]:
    """Report each `scheduler.step` call's input sample, model output and sigma.

    Wrapping the instance's `step` keeps the diffusers denoising loop unforked. Only the
    engine's worker thread calls the pipeline, so the temporary attribute is never shared.
    """
    original = scheduler.step  # type: ignore[attr-defined]

    def step(
        model_output: torch.Tensor,
        timestep: object,
        sample: torch.Tensor,
        *args: object,
        **kwargs: object,
    ) -> object:
        output = original(model_output, timestep, sample, *args, **kwargs)
        sigma = float(scheduler.sigmas[scheduler.step_index - 1])  # type: ignore[attr-defined]
        on_step(StepObservation(sample=sample, velocity=model_output, sigma=sigma))
        return output

    scheduler.step = step  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del scheduler.step  # type: ignore[attr-defined]
