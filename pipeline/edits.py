"""Edits on the loaded weights: img2img, inpainting, and reference editing with Kontext.

Each mode is a diffusers pipeline made once from the loaded FLUX pipeline's components,
so all of them share its modules: one copy of the weights, whatever the mode. The mode
follows from the model and the request: a Kontext model edits by reference, other FLUX
models start from the noised input (img2img); a mask turns either into inpainting.

Inpainting blends latents, but the VAE round trip still alters the pixels it was meant to
keep, so the final image (and each preview) gets the original pixels pasted back outside
the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)
from PIL import Image, ImageOps

from pipeline.jobs import EditInputs

# (Kontext model, masked) -> the pipeline class of that mode.
EDIT_PIPELINES: dict[tuple[bool, bool], type[DiffusionPipeline]] = {
    (False, False): FluxImg2ImgPipeline,
    (False, True): FluxInpaintPipeline,
    (True, False): FluxKontextPipeline,
    (True, True): FluxKontextInpaintPipeline,
}


def edit_pipelines(pipe: FluxPipeline, *, kontext: bool) -> dict[bool, DiffusionPipeline]:
    """The model's edit pipelines by `masked`, sharing every module of `pipe`.

    Built from `pipe.components`, not with `from_pipe`: that casts the shared modules to
    float32 unless given a dtype, and casts fp8 weights to any dtype it is given, so it
    would quietly turn a bf16 or fp8 model into a float32 one.
    """
    pipes = {}
    for masked in (False, True):
        edit_pipe = EDIT_PIPELINES[(kontext, masked)](**pipe.components)
        edit_pipe.set_progress_bar_config(disable=True)
        pipes[masked] = edit_pipe
    return pipes


@dataclass(frozen=True)
class PreparedEdit:
    """An edit's input at the size the pipeline generates, with its mask if any."""

    image: Image.Image
    mask: Image.Image | None
    strength: float

    @classmethod
    def of(cls, edit: EditInputs, size: tuple[int, int]) -> PreparedEdit:
        """Scale the input (and mask) to cover `size`, cropping the centre: an output of
        another shape than the input is a crop of it, never a distortion."""
        image = ImageOps.fit(edit.images[0], size, Image.Resampling.LANCZOS)
        mask = edit.mask
        if mask is not None:
            # Nearest keeps the mask binary: a pixel is either kept or repainted.
            mask = ImageOps.fit(mask, size, Image.Resampling.NEAREST)
        return cls(image=image, mask=mask, strength=edit.strength)

    def keep_unmasked(self, generated: Image.Image) -> Image.Image:
        """`generated` with the input's own pixels wherever the mask says to keep them."""
        if self.mask is None:
            return generated
        image, mask = self.image, self.mask
        if generated.size != image.size:
            image = image.resize(generated.size, Image.Resampling.BILINEAR)
            mask = mask.resize(generated.size, Image.Resampling.NEAREST)
        return Image.composite(generated.convert("RGB"), image, mask)

    def arguments(self, *, kontext: bool, count: int) -> dict[str, Any]:
        """The mode's own keyword arguments for a call that makes `count` images.

        img2img and inpainting sample the input's latent with a generator: given one input,
        they sample it once with the first image's generator, so that image i of n would not
        be the image its seed gives alone. One input per image samples each with its own.
        Kontext takes the latent's mean, and a list would mean several reference images.
        """
        arguments: dict[str, Any] = {"image": self.image if kontext else [self.image] * count}
        if self.mask is not None:
            arguments["mask_image"] = self.mask
        if self.mask is not None or not kontext:
            arguments["strength"] = self.strength
        if kontext:
            # Kontext rescales its output to `max_area` and its input to one of its
            # preferred sizes; the input is already at the job's size, and so must stay.
            width, height = self.image.size
            arguments.update(max_area=width * height, _auto_resize=False)
        return arguments
