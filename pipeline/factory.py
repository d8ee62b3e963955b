"""Compose the model side: load the pipeline, fit its preview decoder, start the engine."""

from __future__ import annotations

from pipeline.engine import ThreadedEngine
from pipeline.jobs import Job, ModelProfile
from pipeline.loading import ModelSpec, model_profile, prepare_pipeline
from pipeline.previews import fit_linear_decoder
from pipeline.runner import FluxRunner


def create_flux_runner(spec: ModelSpec) -> FluxRunner:
    """Load `spec` and fit its preview decoder; raises `ModelLoadError` with a clear line."""
    pipe, applied = prepare_pipeline(spec)
    return FluxRunner(pipe, model_profile(spec.model, pipe, applied), fit_linear_decoder(pipe.vae))


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


def create_flux_engine(spec: ModelSpec, *, max_queued: int, warmup: bool = True) -> ThreadedEngine:
    runner = create_flux_runner(spec)
    return ThreadedEngine(
        runner, max_queued=max_queued, warmup=warmup_job(runner.profile) if warmup else None
    )
