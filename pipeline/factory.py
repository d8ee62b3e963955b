"""Compose the model side: load the pipeline, prepare its preview decoders, start the engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from diffusers import FluxPipeline

from pipeline.acceleration import EMBEDDED_THRESHOLDS, FLUX_THRESHOLDS, runs_compiled
from pipeline.embedded import TINY_VAE_DIR
from pipeline.engine import ThreadedEngine
from pipeline.jobs import Job, ModelProfile
from pipeline.loading import (
    EMBEDDED_MODELS,
    ModelSpec,
    is_kontext_model,
    load_tiny_vae,
    model_profile,
    prepare_pipeline,
    resolve_device,
)
from pipeline.preview_cache import cached_linear_decoder
from pipeline.previews import AutoencoderPreviewDecoder, PreviewDecoder
from pipeline.runner import FluxRunner
from pipeline.safety import ClassifierSafetyChecker, SafetySpec


def tiny_vae_folder(spec: ModelSpec) -> Path | None:
    """The tiny preview decoder: the folder given, else the embedded model's own."""
    if spec.tiny_vae is not None:
        return spec.tiny_vae
    return TINY_VAE_DIR if spec.model in EMBEDDED_MODELS else None


def preview_decoders(pipe: FluxPipeline, spec: ModelSpec) -> dict[str, PreviewDecoder]:
    """`linear` (fitted once per VAE, cached), `vae`, and `tiny` when it has a folder."""
    decoders: dict[str, PreviewDecoder] = {
        "linear": cached_linear_decoder(pipe.vae, spec.cache_dir),
        "vae": AutoencoderPreviewDecoder(pipe.vae, pipe.vae_scale_factor),
    }
    folder = tiny_vae_folder(spec)
    if folder is not None:
        tiny = load_tiny_vae(folder, pipe)
        decoders["tiny"] = AutoencoderPreviewDecoder(tiny, pipe.vae_scale_factor)
    return decoders


def create_flux_runner(spec: ModelSpec, safety: SafetySpec | None = None) -> FluxRunner:
    """Load `spec` (and the safety model, if any) and its preview decoders; raises
    `ModelLoadError` or `SafetyCheckerLoadError` with a clear line. The small safety model
    loads first, so that a wrong path fails in a second, not after the big model."""
    checker = (
        ClassifierSafetyChecker(safety, resolve_device(spec.device)) if safety is not None else None
    )
    pipe, applied = prepare_pipeline(spec)
    decoders = preview_decoders(pipe, spec)
    runner = FluxRunner(
        pipe,
        dataclasses.replace(
            model_profile(spec.model, pipe, applied), preview_decoders=tuple(decoders)
        ),
        decoders,
        thresholds=EMBEDDED_THRESHOLDS if spec.model in EMBEDDED_MODELS else FLUX_THRESHOLDS,
        kontext=is_kontext_model(spec),
    )
    return runner if checker is None else runner.with_safety_checker(checker)


def warmup_jobs(profile: ModelProfile, size: tuple[int, int]) -> tuple[Job, ...]:
    """A request of the default `size`, previews included, so that its compiled
    graphs and allocations are the ones real requests reuse.

    A compiled model also runs short requests that compile what the default one leaves
    out: two images at once (compiled graphs specialise a batch of one) and the
    first-block cache of `acceleration`, whose hooks change the blocks' graphs. After them
    no request compiles, whatever its size, `n` or acceleration.
    """
    default = Job(
        prompt="warm-up",
        width=size[0],
        height=size[1],
        seeds=(0,),
        num_inference_steps=profile.default_steps,
        guidance_scale=profile.default_guidance,
        partial_images=1,
    )
    if not runs_compiled(profile.speedups):
        return (default,)
    short = dataclasses.replace(default, num_inference_steps=4, partial_images=0)
    pair = dataclasses.replace(short, seeds=(0, 1))
    return (
        default,
        pair,
        dataclasses.replace(short, acceleration="high"),
        dataclasses.replace(pair, acceleration="high"),
    )


def create_flux_engine(
    spec: ModelSpec,
    *,
    max_queued: int,
    warmup_size: Callable[[ModelProfile], tuple[int, int]] | None,
    safety: SafetySpec | None = None,
    max_queue_wait_s: float | None = None,
    max_run_s: float | None = None,
    max_batch_size: int = 1,
) -> ThreadedEngine:
    runner = create_flux_runner(spec, safety)
    return ThreadedEngine(
        runner,
        max_queued=max_queued,
        warmup=(
            () if warmup_size is None else warmup_jobs(runner.profile, warmup_size(runner.profile))
        ),
        max_queue_wait_s=max_queue_wait_s,
        max_run_s=max_run_s,
        max_batch_size=max_batch_size,
    )
