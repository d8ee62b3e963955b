"""Image safety checking: a small pluggable interface, and a checker built on a local
image-classification model (any transformers `AutoModelForImageClassification` folder, such
as an NSFW detector fine-tuned from ViT).

The runner calls the checker on every final image and every preview of a job that asks for
it; a flagged image is never handed to the HTTP side. Loading is offline, like the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification


class SafetyChecker(Protocol):
    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        """One verdict per image: True means the image must not be returned."""
        ...


class SafetyCheckerLoadError(Exception):
    """The configured safety model could not be loaded; the message says why in one line."""


@dataclass(frozen=True)
class SafetySpec:
    model: Path
    labels: tuple[str, ...] = ("nsfw",)
    threshold: float = 0.5


class ClassifierSafetyChecker:
    """Flags an image when the summed probability of the flagged labels reaches a threshold.

    Labels are matched case-insensitively against the model's `id2label`; a spec naming no
    label of the model is a load error, since it would silently pass everything.
    """

    def __init__(self, spec: SafetySpec, device: torch.device | str = "cpu") -> None:
        try:
            self._processor = AutoImageProcessor.from_pretrained(spec.model, local_files_only=True)
            model = AutoModelForImageClassification.from_pretrained(
                spec.model, local_files_only=True
            )
        except (OSError, ValueError) as error:
            raise SafetyCheckerLoadError(
                f"could not load the safety checker from {spec.model}: it must be a local "
                f"image-classification model folder ({type(error).__name__})"
            ) from error
        self._model = model.to(device).eval()
        wanted = {label.lower() for label in spec.labels}
        self._flagged_ids = [
            int(index) for index, label in model.config.id2label.items() if label.lower() in wanted
        ]
        if not self._flagged_ids:
            raise SafetyCheckerLoadError(
                f"the safety checker's labels {sorted(model.config.id2label.values())} include "
                f"none of {sorted(wanted)}"
            )
        self._threshold = spec.threshold

    @torch.inference_mode()
    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        if not images:
            return []
        inputs = self._processor(
            images=[image.convert("RGB") for image in images], return_tensors="pt"
        )
        inputs = {name: tensor.to(self._model.device) for name, tensor in inputs.items()}
        probabilities = self._model(**inputs).logits.float().softmax(dim=-1)
        scores = probabilities[:, self._flagged_ids].sum(dim=-1)
        return [bool(score >= self._threshold) for score in scores]
