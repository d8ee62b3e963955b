"""Compose the model side: load the pipeline, fit its preview decoder, start the engine."""

from __future__ import annotations

from pipeline.engine import ThreadedEngine
from pipeline.loading import ModelSpec, load_pipeline, model_profile
from pipeline.previews import fit_linear_decoder
from pipeline.runner import FluxRunner


def create_flux_runner(spec: ModelSpec) -> FluxRunner:
    """Load `spec` and fit its preview decoder; raises `ModelLoadError` with a clear line."""
    pipe = load_pipeline(spec)
    return FluxRunner(pipe, model_profile(spec.model, pipe), fit_linear_decoder(pipe.vae))


def create_flux_engine(spec: ModelSpec, *, max_queued: int) -> ThreadedEngine:
    return ThreadedEngine(create_flux_runner(spec), max_queued=max_queued)
