"""Run one job through a loaded FLUX pipeline, turning its step callback into events."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline
from PIL import Image

from pipeline.engine import Emit, StopRequested
from pipeline.jobs import Job, JobCancelled, ModelProfile, Preview, Progress, Result
from pipeline.previews import (
    LinearPreviewDecoder,
    StepObservation,
    observe_scheduler_steps,
    preview_steps,
)


class FluxRunner:
    """Owns the pipeline and its preview decoder; called only from the engine's worker."""

    def __init__(
        self, pipe: FluxPipeline, profile: ModelProfile, decoder: LinearPreviewDecoder
    ) -> None:
        self._pipe = pipe
        self._profile = profile
        self._decoder = decoder

    @property
    def profile(self) -> ModelProfile:
        return self._profile

    @property
    def pipe(self) -> FluxPipeline:
        return self._pipe

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        pipe = self._pipe
        observed: list[StepObservation] = []
        previews_sent = 0

        def remember(seen: StepObservation) -> None:
            observed[:] = [seen]

        def on_step_end(
            pipeline: FluxPipeline, index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal previews_sent
            # Raising here stops the loop before the next transformer call and before the
            # VAE decode; `pipe._interrupt` would still decode.
            if stop_requested():
                raise JobCancelled("the job was cancelled")
            step, total = index + 1, pipeline.num_timesteps
            emit(Progress(step=step, total_steps=total))
            if step in preview_steps(total, job.partial_images) and observed:
                emit(
                    Preview(
                        index=previews_sent,
                        step=step,
                        total_steps=total,
                        image=self._preview(observed[-1], job),
                    )
                )
                previews_sent += 1
            return {}

        generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
        with observe_scheduler_steps(pipe.scheduler, remember):
            output = pipe(
                prompt=job.prompt,
                width=job.width,
                height=job.height,
                num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=job.num_images,
                generator=generators,
                callback_on_step_end=on_step_end,
                output_type="pil",
                **job.pipeline_kwargs,
            )
        return Result(images=tuple(output.images), seeds=job.seeds)

    def _preview(self, seen: StepObservation, job: Job) -> Image.Image:
        clean = seen.predicted_clean()[:1]
        latents = self._pipe._unpack_latents(
            clean, job.height, job.width, self._pipe.vae_scale_factor
        )
        return self._decoder.decode(latents[0], job.preview_size)
