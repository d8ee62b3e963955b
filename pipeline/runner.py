"""Run one job through a loaded FLUX pipeline, turning its step callback into events.

A job with edit inputs runs on the edit pipeline of its mode (see `pipeline.edits`); the
step callback, previews, speed-ups, safety checks and cancellation are the same in every
mode, and previews are spread over the steps the pipeline actually runs (img2img runs
fewer, by `strength`).

Several text-to-image jobs that share a call (`pipeline.engine.shares_call`) run as one
batch: one prompt and one generator per image, so each image depends only on its own
prompt and seed; each job hears every step, gets previews of its own first image, and is
safety-checked on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
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
    AppliedLora,
    ContentFiltered,
    EngineError,
    InvalidLora,
    Job,
    JobCancelled,
    JobRejected,
    LoraRef,
    ModelProfile,
    Preview,
    Progress,
    Result,
)
from pipeline.loras import LoraManager
from pipeline.pixels import to_pil_images
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
        loras: LoraManager | None = None,
    ) -> None:
        self._pipe = pipe
        self._profile = profile
        self._decoders = dict(decoders)
        self._safety_checker = safety_checker
        self._thresholds = thresholds
        self._kontext = kontext
        self._loras = loras
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
            self._pipe,
            profile,
            self._decoders,
            checker,
            self._thresholds,
            kontext=self._kontext,
            loras=self._loras,
        )

    def loaded_loras(self) -> frozenset[str]:
        return frozenset() if self._loras is None else self._loras.loaded()

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        (outcome,) = self.run_batch((job,), (emit,), stop_requested)
        if isinstance(outcome, EngineError):
            raise outcome
        return outcome

    def run_batch(
        self, jobs: Sequence[Job], emits: Sequence[Emit], stop_requested: StopRequested
    ) -> list[Result | EngineError]:
        first = jobs[0]
        speedup = plan_speedup(first, self._thresholds, self._profile.speedups)
        edit = (
            None if first.edit is None else PreparedEdit.of(first.edit, (first.width, first.height))
        )
        # Jobs of one call have the same LoRAs (`shares_call`).
        with self._applied_loras(first.loras) as loras:
            if edit is not None and edit.strength == 0:
                # Zero denoising steps: diffusers refuses them, and the answer is the input.
                images = (edit.image,) * first.num_images
            else:
                images = self._denoise(jobs, edit, speedup, emits, stop_requested)
        outcomes: list[Result | EngineError] = []
        for job, start in zip(jobs, _first_images(jobs), strict=True):
            chunk = images[start : start + job.num_images]
            outcomes.append(self._checked(job, chunk, speedup, loras))
        return outcomes

    def _applied_loras(self, refs: Sequence[LoraRef]) -> AbstractContextManager[Any]:
        if self._loras is None:
            if refs:
                raise InvalidLora("this server has no LoRAs")
            return nullcontext(())
        return self._loras.applied(refs)

    def _checker(self, job: Job) -> SafetyChecker | None:
        return self._safety_checker if job.safety_check else None

    def _checked(
        self,
        job: Job,
        images: tuple[Image.Image, ...],
        speedup: AppliedSpeedup,
        loras: tuple[AppliedLora, ...] = (),
    ) -> Result | EngineError:
        """The job's result, without the images its safety check flags."""
        seeds = job.seeds
        check = self._checker(job)
        if check is not None:
            verdicts = check.flagged(images)
            if all(verdicts):
                return ContentFiltered("every image was flagged by the safety checker")
            kept = [(i, s) for i, s, bad in zip(images, seeds, verdicts, strict=True) if not bad]
            images, seeds = tuple(i for i, _ in kept), tuple(s for _, s in kept)
        return Result(
            images=images,
            seeds=seeds,
            acceleration=speedup.acceleration,
            speedup=speedup.description,
            filtered=len(job.seeds) - len(seeds),
            loras=loras,
        )

    def _denoise(
        self,
        jobs: Sequence[Job],
        edit: PreparedEdit | None,
        speedup: AppliedSpeedup,
        emits: Sequence[Emit],
        stop_requested: StopRequested,
    ) -> tuple[Image.Image, ...]:
        """Run the pipeline of the jobs' mode, emitting progress and previews to each job."""
        observed: list[StepObservation] = []
        previews_sent = [0] * len(jobs)
        firsts = _first_images(jobs)
        started = False

        def remember(seen: StepObservation) -> None:
            observed[:] = [seen]

        def on_step_end(
            pipeline: FluxPipeline, index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal started
            started = True
            # Raising here stops the loop before the next transformer call and before the
            # VAE decode; `pipe._interrupt` would still decode.
            if stop_requested():
                raise JobCancelled("the job was cancelled")
            step, total = index + 1, pipeline.num_timesteps
            for k, (job, emit) in enumerate(zip(jobs, emits, strict=True)):
                emit(Progress(step=step, total_steps=total))
                if step in preview_steps(total, job.partial_images) and observed:
                    image = self._preview(observed[-1], firsts[k], job, edit)
                    # A preview the checker flags is dropped: fewer partials are legal.
                    check = self._checker(job)
                    if check is None or not check.flagged([image])[0]:
                        emit(Preview(previews_sent[k], step, total, image))
                        previews_sent[k] += 1
            return {}

        apply_speedup(self._pipe.transformer, speedup)
        # One generator per image: image i depends only on seeds[i], so it can be
        # reproduced alone with n=1 and that seed.
        seeds = [seed for job in jobs for seed in job.seeds]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        passed = jobs[0].pipeline_kwargs
        try:
            output = self._call(jobs, edit, generators, on_step_end, remember)
        except (TypeError, ValueError) as error:
            if started or not passed:
                raise
            raise JobRejected(
                f"the pipeline rejected the passed-through parameters {', '.join(sorted(passed))}"
            ) from error
        images = to_pil_images(output.images)
        if edit is None:
            return tuple(images)
        return tuple(edit.keep_unmasked(image) for image in images)

    def _call(
        self,
        jobs: Sequence[Job],
        edit: PreparedEdit | None,
        generators: list[torch.Generator],
        on_step_end: Any,
        remember: Any,
    ) -> Any:
        job = jobs[0]
        pipe: Any = self._pipe
        arguments: dict[str, Any] = {}
        # One job: its prompt is encoded once and repeated for its n images. A batch: one
        # prompt per image, in the order of the generators.
        prompt: str | list[str] = job.prompt
        per_prompt = job.num_images
        if len(jobs) > 1:
            prompt, per_prompt = [j.prompt for j in jobs for _ in j.seeds], 1
        if edit is not None:
            pipe = self.edit_pipe(edit.mask is not None)
            arguments = edit.arguments(kontext=self._kontext, count=job.num_images)
        if self._profile.max_sequence_length is not None:
            arguments.setdefault("max_sequence_length", self._profile.max_sequence_length)
        # The first-block cache keeps its state per cache context. FluxPipeline opens one
        # around each transformer call; the img2img, inpaint and Kontext pipelines open
        # none, so the whole call runs in the "cond" context (inner ones simply reset it).
        with (
            observe_scheduler_steps(pipe.scheduler, remember),
            self._pipe.transformer.cache_context("cond"),
        ):
            return pipe(
                prompt=prompt,
                width=job.width,
                height=job.height,
                num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=per_prompt,
                generator=generators,
                callback_on_step_end=on_step_end,
                # Quantised on the device by `to_pil_images`: 3 MB cross to the CPU, not 12.
                output_type="pt",
                **(arguments | dict(job.pipeline_kwargs)),
            )

    def _preview(
        self, seen: StepObservation, image_index: int, job: Job, edit: PreparedEdit | None
    ) -> Image.Image:
        """A preview of image `image_index` of the call, as `job` asks for it."""
        clean = seen.predicted_clean()[image_index : image_index + 1]
        latents = self._pipe._unpack_latents(
            clean, job.height, job.width, self._pipe.vae_scale_factor
        )
        preview = self._decoders[job.preview_decoder].decode(latents[0], job.preview_size)
        return preview if edit is None else edit.keep_unmasked(preview)


def _first_images(jobs: Sequence[Job]) -> list[int]:
    """Where each job's images start in the call's batch of images."""
    starts, total = [], 0
    for job in jobs:
        starts.append(total)
        total += job.num_images
    return starts
