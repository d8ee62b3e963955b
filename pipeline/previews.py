"""Latents to small RGB previews, cheaply enough to run inside the denoising loop.

The default decoder is a linear map from FLUX's 16 latent channels to RGB (3x16 + bias):
the one the model's VAE folder ships, else fitted once per model by least squares against
the model's own VAE. The quality option
decodes with an autoencoder (the model's own VAE, or a tiny TAEF1-style one) at preview
size. Previews show the predicted clean image x0 = x_t - sigma_t * v_t (flow matching),
not the noisy latent, so the first preview already looks like the picture that is forming.

Decoders return a PIL image at preview size and nothing more: encoding and sending happen
on the HTTP side, so the denoising thread never waits for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import ceil
from typing import Protocol

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image

from pipeline.pixels import to_pil_images


def preview_steps(total_steps: int, partial_images: int) -> tuple[int, ...]:
    """The 1-based steps after which previews are taken: evenly spread, distinct, and never
    the last step (the final image is sent as itself, not as a preview)."""
    count = min(partial_images, max(total_steps - 1, 0))
    return tuple(round((j + 1) * total_steps / (count + 1)) for j in range(count))


def pipeline_latents(vae: AutoencoderKL, raw: torch.Tensor) -> torch.Tensor:
    """The VAE's latents as the transformer sees them: FLUX's VAE shifts and scales its
    latents to mean 0 and variance 1 (a VAE without a shift has none)."""
    return (raw - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def vae_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The transformer's latents back as the VAE decodes them: `pipeline_latents` undone."""
    return latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)


class PreviewDecoder(Protocol):
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """Map one unpacked pipeline-space latent (16, h, w) to RGB of `size` (width, height)."""
        ...


def _to_image(rgb: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """(3, h, w) in [0, 1] on any device -> PIL image of `size`; only uint8 leaves the device."""
    (image,) = to_pil_images(rgb[None])
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class LinearPreviewDecoder:
    """RGB in [0, 1] = weight @ latent + bias, per latent pixel (pipeline-space latents)."""

    weight: torch.Tensor  # (3, 16)
    bias: torch.Tensor  # (3,)

    @classmethod
    def from_dict(cls, stored: dict[str, object]) -> LinearPreviewDecoder:
        """From `as_dict`'s JSON form; raises `KeyError`, `TypeError` or `ValueError` on
        anything else, `RuntimeError` on the wrong shapes."""
        weight = torch.tensor(stored["weight"], dtype=torch.float32)
        bias = torch.tensor(stored["bias"], dtype=torch.float32)
        if weight.shape != (3, 16) or bias.shape != (3,):
            raise RuntimeError(f"a 3x16 map and 3 biases, not {tuple(weight.shape)}")
        return cls(weight=weight, bias=bias)

    def as_dict(self) -> dict[str, object]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        latents = latents.detach().float()
        weight = self.weight.to(latents.device)
        bias = self.bias.to(latents.device)
        return _to_image(torch.einsum("oc,chw->ohw", weight, latents) + bias[:, None, None], size)


@dataclass(frozen=True)
class AutoencoderPreviewDecoder:
    """An autoencoder's decode at preview size: the model's VAE, or a tiny TAEF1-style one.

    By default the full decode is resized to the preview size: exactly the final image's
    pixels, made small. With `reduce_latents` the latent is first area-downscaled to the
    preview's size over `scale_factor` (pixels per latent pixel), which makes a 1024 px
    image previewed at 512 px cost a quarter of a decode, but a VAE's latents are not
    images: on the embedded model that preview is far from the decode (15 dB), so it is
    not the default (`bench/previews.py` measures both).

    `device` is where the inputs go when it is not the VAE's own device: an offloaded
    VAE waits on the CPU or the meta device, and its call moves it to `device`.
    """

    vae: AutoencoderKL | AutoencoderTiny
    scale_factor: int
    reduce_latents: bool = False
    device: torch.device | None = None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        device = self.device or self.vae.device
        latents = latents.detach()[None].to(device, self.vae.dtype)
        reduced = (ceil(size[1] / self.scale_factor), ceil(size[0] / self.scale_factor))
        if self.reduce_latents and reduced[0] * reduced[1] < latents[0, 0].numel():
            latents = torch.nn.functional.interpolate(latents, size=reduced, mode="area")
        decoded = self.vae.decode(vae_latents(self.vae, latents), return_dict=False)[0][0].float()
        return _to_image((decoded + 1) / 2, size)


def _synthetic_images(count: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1]: varied enough to span the VAE's colour space."""
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    fine = torch.rand(count, 3, 16, 16, generator=generator) * 0.6 - 0.3
    images = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic")
    images = images + torch.nn.functional.interpolate(fine, size=(side, side), mode="bilinear")
    return images.clamp(-1, 1)


def _smooth_fields(
    count: int, channels: int, side: int, generator: torch.Generator
) -> torch.Tensor:
    """Smooth unit-variance random latents: the range the denoiser passes through."""
    coarse = torch.randn(count, channels, 4, 4, generator=generator)
    fields = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic")
    return fields + 0.5 * torch.randn(count, channels, side, side, generator=generator)


@torch.no_grad()
def sample_latents(
    vae: AutoencoderKL, count: int, side: int, generator: torch.Generator
) -> torch.Tensor:
    """Pipeline-space latents (n, 16, side/8, side/8) to fit previews on, of two kinds.

    Encodings of synthetic images are what finished pictures look like to a trained VAE;
    smooth unit-variance fields are what the denoiser passes through. The second kind
    matters when the encoder's range does not match the scaling factor, as in the
    embedded model's random VAE, whose encodings are seven times smaller than the
    pipeline's latents: a map fitted on them alone extrapolates wildly.
    """
    images = _synthetic_images(count, side, generator).to(vae.device, vae.dtype)
    encoded = pipeline_latents(vae, vae.encode(images).latent_dist.mean.float().cpu())
    fields = _smooth_fields(count, encoded.shape[1], encoded.shape[-1], generator)
    return torch.cat([encoded, fields])


@torch.no_grad()
def fit_linear_decoder(
    vae: AutoencoderKL, samples: int = 8, side: int = 128
) -> LinearPreviewDecoder:
    """Fit the 16->3 map on pairs (latent pixel, VAE-decoded colour averaged over its patch)."""
    config = vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    latents = sample_latents(vae, samples, side, torch.Generator().manual_seed(0))
    unscaled = vae_latents(vae, latents)
    decoded = vae.decode(unscaled.to(vae.device, vae.dtype), return_dict=False)[0].float().cpu()
    target = torch.nn.functional.avg_pool2d((decoded + 1) / 2, factor)  # (n, 3, h, w) in [0, 1]
    source = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    design = torch.cat([source, torch.ones(len(source), 1)], dim=1)
    solution = torch.linalg.lstsq(design, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return LinearPreviewDecoder(weight=solution[:-1].T.contiguous(), bias=solution[-1].contiguous())


@dataclass
class StepObservation:
    """What the scheduler saw at the last step: enough to reconstruct x0."""

    sample: torch.Tensor
    velocity: torch.Tensor
    sigma: torch.Tensor  # 0-d, on the scheduler's device: reading it would sync every step

    def predicted_clean(self) -> torch.Tensor:
        return self.sample - self.sigma * self.velocity


@contextmanager
def observe_scheduler_steps(
    scheduler: object, on_step: Callable[[StepObservation], None]
) -> Iterator[None]:
    """Report each `scheduler.step` call's input sample, model output and sigma.

    Nothing here leaves the device: diffusers keeps `sigmas` on it, and a host read per
    step would stall the GPU's queue at every step, previews or not.

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
        sigma = scheduler.sigmas[scheduler.step_index - 1]  # type: ignore[attr-defined]
        on_step(StepObservation(sample=sample, velocity=model_output, sigma=sigma))
        return output

    scheduler.step = step  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del scheduler.step  # type: ignore[attr-defined]
