"""Run one job through a loaded FLUX pipeline, turning its step callback into events.

A job with edit inputs runs on the edit pipeline of its mode (see `pipeline.edits`); the
step callback, previews, speed-ups, safety checks and cancellation are the same in every
mode, and previews are spread over the steps the pipeline actually runs (img2img runs
fewer, by `strength`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FluxPipeline
from PIL import Image

from pipeline.acceleration import (
    FLUX_THRESHOLDS,
    AppliedSpeedup,
    Thresholds,
    apply_speedup,
    plan_speedup,
)
from pipeline.edits import PreparedEdit, edit_pipelines
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
        *,
        kontext: bool = False,
    ) -> None:
        self._pipe = pipe
        self._profile = profile
        self._decoders = dict(decoders)
        self._safety_checker = safety_checker
        self._thresholds = thresholds
        self._kontext = kontext
        self._edit_pipes = edit_pipelines(pipe, kontext=kontext)

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

    def edit_pipe(self, masked: bool) -> Any:
        """The edit pipeline used for jobs with (or without) a mask."""
        return self._edit_pipes[masked]

    def with_safety_checker(self, checker: SafetyChecker) -> FluxRunner:
        """The same pipeline and decoders, checking outputs with `checker`."""
        profile = dataclasses.replace(self._profile, safety_checker=True)
        return FluxRunner(
            self._pipe, profile, self._decoders, checker, self._thresholds, kontext=self._kontext
        )

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        check = self._safety_checker if job.safety_check else None
        speedup = plan_speedup(job, self._thresholds, self._profile.speedups)
        edit = None if job.edit is None else PreparedEdit.of(job.edit, (job.width, job.height))
        if edit is not None and edit.strength == 0:
            # Zero denoising steps: diffusers refuses them, and the answer is the input.
            images = (edit.image,) * job.num_images
        else:
            images = self._denoise(job, edit, speedup, check, emit, stop_requested)
        seeds = job.seeds
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

    def _denoise(
        self,
        job: Job,
        edit: PreparedEdit | None,
        speedup: AppliedSpeedup,
        check: SafetyChecker | None,
        emit: Emit,
        stop_requested: StopRequested,
    ) -> tuple[Image.Image, ...]:
        """Run the pipeline of the job's mode, emitting progress and previews."""
        observed: list[StepObservation] = []
        previews_sent = 0
        started = False

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
                image = self._preview(observed[-1], job, edit)
                # A preview the checker flags is dropped: fewer partials are legal.
                if check is None or not check.flagged([image])[0]:
                    emit(Preview(previews_sent, step, total, image))
                    previews_sent += 1
            return {}

        apply_speedup(self._pipe.transformer, speedup)
        # One generator per image: image i depends only on seeds[i], so it can be
        # reproduced alone with n=1 and that seed.
        generators = [torch.Generator().manual_seed(seed) for seed in job.seeds]
        try:
            output = self._call(job, edit, generators, on_step_end, remember)
        except (TypeError, ValueError) as error:
            if started or not job.pipeline_kwargs:
                raise
            raise JobRejected(
                f"the pipeline rejected the passed-through parameters "
                f"{', '.join(sorted(job.pipeline_kwargs))}"
            ) from error
        if edit is None:
            return tuple(output.images)
        return tuple(edit.keep_unmasked(image) for image in output.images)

    def _call(
        self,
        job: Job,
        edit: PreparedEdit | None,
        generators: list[torch.Generator],
        on_step_end: Any,
        remember: Any,
    ) -> Any:
        pipe: Any = self._pipe
        arguments: dict[str, Any] = {}
        if edit is not None:
            pipe = self.edit_pipe(edit.mask is not None)
            arguments = edit.arguments(kontext=self._kontext)
        # The first-block cache keeps its state per cache context. FluxPipeline opens one
        # around each transformer call; the img2img, inpaint and Kontext pipelines open
        # none, so the whole call runs in the "cond" context (inner ones simply reset it).
        with (
            observe_scheduler_steps(pipe.scheduler, remember),
            self._pipe.transformer.cache_context("cond"),
        ):
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
                **arguments,
                **job.pipeline_kwargs,
            )

    def _preview(self, seen: StepObservation, job: Job, edit: PreparedEdit | None) -> Image.Image:
        clean = seen.predicted_clean()[:1]
        latents = self._pipe._unpack_latents(
            clean, job.height, job.width, self._pipe.vae_scale_factor
        )
        preview = self._decoders[job.preview_decoder].decode(latents[0], job.preview_size)
        return preview if edit is None else edit.keep_unmasked(preview)
