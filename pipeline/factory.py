"""Compose the model side: load the pipeline, prepare its preview decoders, start the engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diffusers import FluxPipeline

from pipeline.acceleration import runs_compiled
from pipeline.embedded import TINY_VAE_DIR
from pipeline.engine import ThreadedEngine
from pipeline.jobs import Job, ModelProfile
from pipeline.loading import (
    EMBEDDED_MODELS,
    ModelSpec,
    is_kontext_model,
    load_tiny_vae,
    model_profile,
    place_pipeline,
    read_pipeline,
    resolve_device,
)
from pipeline.loras import BLANK, LoraManager, lora_target
from pipeline.preview_cache import linear_decoder
from pipeline.previews import AutoencoderPreviewDecoder, LinearPreviewDecoder, PreviewDecoder
from pipeline.runner import FluxRunner
from pipeline.safety import ClassifierSafetyChecker, SafetySpec


def tiny_vae_folder(spec: ModelSpec) -> Path | None:
    """The tiny preview decoder: the folder given, else the embedded model's own."""
    if spec.tiny_vae is not None:
        return spec.tiny_vae
    return TINY_VAE_DIR if spec.model in EMBEDDED_MODELS else None


def auto_preview(spec: ModelSpec) -> str:
    """`tiny` where a tiny VAE was given at start-up (TAEF1 decodes in a few ms next to a
    FLUX step of 100+), else `linear`. The embedded model's own tiny decoder is offered
    but not the default: next to its 17 ms steps it costs about three (bench.previews)."""
    return "tiny" if spec.tiny_vae is not None else "linear"


def preview_decoders(
    pipe: FluxPipeline, spec: ModelSpec, linear: LinearPreviewDecoder
) -> dict[str, PreviewDecoder]:
    """`linear` (fitted before placing), `vae`, and `tiny` when it has a folder. The
    autoencoders take their inputs on the pipeline's execution device: under model offload
    the VAE sits on the CPU until its call moves it to the GPU."""
    device = pipe._execution_device
    decoders: dict[str, PreviewDecoder] = {
        "linear": linear,
        "vae": AutoencoderPreviewDecoder(pipe.vae, pipe.vae_scale_factor, device=device),
    }
    folder = tiny_vae_folder(spec)
    if folder is not None:
        tiny = load_tiny_vae(folder, pipe)
        decoders["tiny"] = AutoencoderPreviewDecoder(tiny, pipe.vae_scale_factor, device=device)
    return decoders


def create_flux_runner(spec: ModelSpec, safety: SafetySpec | None = None) -> FluxRunner:
    """Load `spec` (and the safety model, if any) and its preview decoders; raises
    `ModelLoadError` or `SafetyCheckerLoadError` with a clear line. The small safety model
    loads first, so that a wrong path fails in a second, not after the big model."""
    checker = (
        ClassifierSafetyChecker(safety, resolve_device(spec.device)) if safety is not None else None
    )
    pipe = read_pipeline(spec)
    # Before placing: offloading moves the VAE's weights to the meta device (sequential)
    # or to the GPU at each call (model), where the fit's CPU inputs would not follow.
    linear = linear_decoder(pipe.vae, spec.cache_dir)
    applied = place_pipeline(pipe, spec)
    decoders = preview_decoders(pipe, spec, linear)
    loras = None
    if spec.loras is not None:
        loras = LoraManager(lora_target(pipe.transformer, runs_compiled(applied)), spec.loras)
    runner = FluxRunner(
        pipe,
        dataclasses.replace(
            model_profile(spec.model, pipe, applied),
            preview_decoders=tuple(decoders),
            auto_preview=auto_preview(spec),
            loras=loras is not None,
            lora_max_rank=None if loras is None else loras.max_rank,
        ),
        decoders,
        kontext=is_kontext_model(spec),
        loras=loras,
    )
    return runner if checker is None else runner.with_safety_checker(checker)


def warmup_jobs(profile: ModelProfile, size: tuple[int, int]) -> tuple[Job, ...]:
    """A request of the default `size`, previews included, so that its compiled
    graphs and allocations are the ones real requests reuse.

    A compiled model also runs a short request of two images at once, since compiled
    graphs specialise a batch of one. After it no request compiles, whatever its size, `n`
    or acceleration: the first-block cache's hooks run eagerly around the compiled blocks
    (`pipeline.speedups.compile_blocks`), so they need no warm-up of their own. With
    LoRAs, the same requests run again with the slot on (the blank LoRA), the blocks' other
    variant, so that switching LoRAs compiles nothing either.
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
    pair = dataclasses.replace(default, num_inference_steps=4, seeds=(0, 1), partial_images=0)
    if not profile.loras:
        return (default, pair)
    with_lora = tuple(dataclasses.replace(job, loras=(BLANK,)) for job in (default, pair))
    return (default, pair, *with_lora)


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
    """The runner is made in a thread that ends once it is made, so that the engine's
    worker is the only thread left that ever ran torch: GNU OpenMP (torch's CPU builds)
    keeps a team of threads for each thread that ran parallel torch code, and once those
    outnumber the cores it stops spinning between parallel regions. The worker then slept
    and woke around every operator: a 256x256 image took 380 ms in it against 176 ms in the
    thread that loaded the model (`bench.stream_overhead` measures the difference)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxstream-load") as loader:
        runner = loader.submit(create_flux_runner, spec, safety).result()
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
