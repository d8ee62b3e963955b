"""Compose the model side: load the pipeline, fit its preview decoder, start the engine."""

from __future__ import annotations

from pipeline.acceleration import EMBEDDED_THRESHOLDS, FLUX_THRESHOLDS
from pipeline.engine import ThreadedEngine
from pipeline.jobs import Job, ModelProfile
from pipeline.loading import EMBEDDED, ModelSpec, model_profile, prepare_pipeline, resolve_device
from pipeline.previews import fit_linear_decoder
from pipeline.runner import FluxRunner
from pipeline.safety import ClassifierSafetyChecker, SafetySpec


def create_flux_runner(spec: ModelSpec, safety: SafetySpec | None = None) -> FluxRunner:
    """Load `spec` (and the safety model, if any) and fit its preview decoder; raises
    `ModelLoadError` or `SafetyCheckerLoadError` with a clear line. The small safety model
    loads first, so that a wrong path fails in a second, not after the big model."""
    checker = (
        ClassifierSafetyChecker(safety, resolve_device(spec.device)) if safety is not None else None
    )
    pipe, applied = prepare_pipeline(spec)
    runner = FluxRunner(
        pipe,
        model_profile(spec.model, pipe, applied),
        fit_linear_decoder(pipe.vae),
        thresholds=EMBEDDED_THRESHOLDS if spec.model == EMBEDDED else FLUX_THRESHOLDS,
    )
    return runner if checker is None else runner.with_safety_checker(checker)


def warmup_job(profile: ModelProfile, side: int = 1024) -> Job:
    """A request shaped like the default one, previews included, so that its compiled
    graphs and allocations are the ones real requests reuse."""
    return Job(
        prompt="warm-up",
        width=side,
        height=side,
        seeds=(0,),
        num_inference_steps=profile.default_steps,
        guidance_scale=profile.default_guidance,
        partial_images=1,
    )


def create_flux_engine(
    spec: ModelSpec,
    *,
    max_queued: int,
    warmup: bool = True,
    safety: SafetySpec | None = None,
    max_queue_wait_s: float | None = None,
    max_run_s: float | None = None,
) -> ThreadedEngine:
    runner = create_flux_runner(spec, safety)
    return ThreadedEngine(
        runner,
        max_queued=max_queued,
        warmup=warmup_job(runner.profile) if warmup else None,
        max_queue_wait_s=max_queue_wait_s,
        max_run_s=max_run_s,
    )
