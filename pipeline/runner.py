"""Run one job through a loaded FLUX pipeline, turning its step callback into events."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FluxPipeline
from PIL import Image

from pipeline.acceleration import FLUX_THRESHOLDS, Thresholds, apply_speedup, plan_speedup
from pipeline.engine import Emit, StopRequested
from pipeline.jobs import (
    ContentFiltered,
    Job,
    JobCancelled,
    JobRejected,
    ModelProfile,
    Preview,
    Progress,
    Result,
)
from pipeline.previews import (
    PreviewDecoder,
    StepObservation,
    observe_scheduler_steps,
    preview_steps,
)
from pipeline.safety import SafetyChecker


class FluxRunner:
    """Owns the pipeline and its preview decoders; called only from the engine's worker.

    `decoders` maps the names a request may ask for (`Job.preview_decoder`) to decoders.
    """

    def __init__(
        self,
        pipe: FluxPipeline,
        profile: ModelProfile,
        decoders: Mapping[str, PreviewDecoder],
        safety_checker: SafetyChecker | None = None,
        thresholds: Thresholds = FLUX_THRESHOLDS,
    ) -> None:
        self._pipe = pipe
        self._profile = profile
        self._decoders = dict(decoders)
        self._safety_checker = safety_checker
        self._thresholds = thresholds

    @property
    def profile(self) -> ModelProfile:
        return self._profile

    @property
    def pipe(self) -> FluxPipeline:
        return self._pipe

    @property
    def decoders(self) -> Mapping[str, PreviewDecoder]:
        return self._decoders

    @property
    def thresholds(self) -> Thresholds:
        """First-block-cache thresholds of this model, per `acceleration` level."""
        return self._thresholds

    def with_safety_checker(self, checker: SafetyChecker) -> FluxRunner:
        """The same pipeline and decoders, checking outputs with `checker`."""
        profile = dataclasses.replace(self._profile, safety_checker=True)
        return FluxRunner(self._pipe, profile, self._decoders, checker, self._thresholds)

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        pipe = self._pipe
        observed: list[StepObservation] = []
        previews_sent = 0
        started = False
        check = self._safety_checker if job.safety_check else None

        def remember(seen: StepObservation) -> None:
            observed[:] = [seen]

        def on_step_end(
            pipeline: FluxPipeline, index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal previews_sent, started
            started = True
            # Raising here stops the loop before the next transformer call and before the
            # VAE decode; `pipe._interrupt` would still decode.
            if stop_requested():
                raise JobCancelled("the job was cancelled")
            step, total = index + 1, pipeline.num_timesteps
            emit(Progress(step=step, total_steps=total))
            if step in preview_steps(total, job.partial_images) and observed:
                image = self._preview(observed[-1], job)
                # A preview the checker flags is dropped: fewer partials are legal.
                if check is None or not check.flagged([image])[0]:
                    emit(Preview(previews_sent, step, total, image))
                    previews_sent += 1
            return {}

        speedup = plan_speedup(job, self._thresholds, self._profile.speedups)
        apply_speedup(pipe.transformer, speedup)
        # One generator per image: image i depends only on seeds[i], so it can be
        # reproduced alone with n=1 and that seed.
        generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
        try:
            output = self._call(job, generators, on_step_end, remember)
        except (TypeError, ValueError) as error:
            if started or not job.pipeline_kwargs:
                raise
            raise JobRejected(
                f"the pipeline rejected the passed-through parameters "
                f"{', '.join(sorted(job.pipeline_kwargs))}"
            ) from error
        images, seeds = tuple(output.images), job.seeds
        if check is not None:
            verdicts = check.flagged(images)
            if all(verdicts):
                raise ContentFiltered("every image was flagged by the safety checker")
            kept = [(i, s) for i, s, bad in zip(images, seeds, verdicts, strict=True) if not bad]
            images, seeds = tuple(i for i, _ in kept), tuple(s for _, s in kept)
        return Result(
            images=images,
            seeds=seeds,
            acceleration=speedup.acceleration,
            speedup=speedup.description,
            filtered=len(job.seeds) - len(seeds),
        )

    def _call(
        self,
        job: Job,
        generators: list[torch.Generator],
        on_step_end: Any,
        remember: Any,
    ) -> Any:
        pipe = self._pipe
        with observe_scheduler_steps(pipe.scheduler, remember):
            return pipe(
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

    def _preview(self, seen: StepObservation, job: Job) -> Image.Image:
        clean = seen.predicted_clean()[:1]
        latents = self._pipe._unpack_latents(
            clean, job.height, job.width, self._pipe.vae_scale_factor
        )
        return self._decoders[job.preview_decoder].decode(latents[0], job.preview_size)
