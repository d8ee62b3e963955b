"""FLUX speed through fluxstream's own engine: per step, per image, previews, compile, memory.

The cost of a denoising step does not depend on the weights' values, so by default this
builds the full-size FLUX.1 [dev] architecture (11.9 B transformer parameters, T5-XXL,
CLIP-L, the 16-channel VAE) with random weights directly on the GPU, and needs no
download. `--model` loads real weights instead. `--tiny` runs the same code on the CPU on
the embedded model at a small size; the test suite runs it so that this script cannot rot.
`--model embedded` runs the embedded model on the chosen device (the GPU, say).

    .venv/bin/python -m bench.gpu                        # full-size, 1024², 28 steps, CUDA
    .venv/bin/python -m bench.gpu --quantize fp8         # plus the output difference vs bf16
    .venv/bin/python -m bench.gpu --quantize fp8-torchao # torchao's float8, to compare
    .venv/bin/python -m bench.gpu --lora-rank 64          # plus per-request LoRA figures
    .venv/bin/python -m bench.gpu --profile               # plus a profile of three steps
    .venv/bin/python -m bench.gpu --tiny --json out.json

With `--lora-rank R` the model serves LoRAs as `--lora-dir` does (QKV unfused; compiled,
the hot-swap slot of rank R), and the run adds the step and image time with one random
LoRA of rank R and with two of rank R/2 (together filling the slot), the time to switch
to a cached LoRA and to one read from disk, and with `--quantize`, fp8 + LoRA against
bf16 + the same LoRA. `graphs_compiled_after_warmup` counts these requests too, so 0
means that switching LoRAs compiled nothing.

Each figure goes through `ThreadedEngine` + `FluxRunner`, as a request would: the image
time includes the VAE decode and PNG encoding of the final image; "warm-up" is the time
from engine start until its first (compiling) generation is done.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)
from torch._dynamo.utils import counters
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from bench.lora import psnr, random_lora, switch_ms
from pipeline.acceleration import runs_compiled
from pipeline.embedded import build_embedded_pipeline, embedded_tokenizers, flux_scheduler, flux_vae
from pipeline.engine import ThreadedEngine
from pipeline.factory import warmup_jobs
from pipeline.jobs import Job, LoraRef, Progress, Result
from pipeline.loading import ModelSpec, load_pipeline, model_profile, resolve_device
from pipeline.loras import LoraBranches, LoraManager, LoraSlot, LoraSpec, lora_target
from pipeline.previews import fit_linear_decoder
from pipeline.runner import FluxRunner
from pipeline.speedups import SpeedupError, Speedups, apply_speedups
from stream.images import encode_image

ATTENTION_BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "_native_math",
    "flash",
    "_flash_3",
    "sage",
    "xformers",
)
TEXT_TOKENS = 512


@dataclass
class Measurement:
    partial_images: int
    step_ms: float
    image_s: float


def _random_init(model: torch.nn.Module) -> None:
    """Small normal weights, zero biases, and norm scales of 1 as a trained model has them:
    zero RMSNorm and T5 norm scales would make T5's output exactly zero, so that the
    first-block cache's skipping and the fp8 quality figure would measure a dead model."""
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.dim() > 1:
                torch.nn.init.normal_(parameter, std=0.02)
            elif is_norm and name == "weight":
                parameter.fill_(1.0)
            else:
                parameter.zero_()


def _on_device(build: Callable[[], Any], device: torch.device, dtype: torch.dtype) -> Any:
    """Build a model with no CPU copy of its weights: on the meta device, cast there (free),
    then allocated in `dtype`, so that no float32 copy (48 GB for FLUX.1 + T5) ever exists.
    Only for models without computed buffers, which `to_empty` would leave as garbage."""
    with torch.device("meta"):
        model = build().to(dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        _random_init(model)
    return model


def full_size_pipeline(device: torch.device, dtype: torch.dtype) -> FluxPipeline:
    """FLUX.1 [dev]'s architecture with random weights (configs from its model_index)."""
    torch.manual_seed(0)
    transformer = _on_device(lambda: FluxTransformer2DModel(guidance_embeds=True), device, dtype)
    t5_config = T5Config(
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
    )
    t5 = _on_device(lambda: T5EncoderModel(t5_config), device, dtype)
    clip_config = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
    )
    clip = CLIPTextModel(clip_config).to(device, dtype)
    vae = flux_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2).to(device, dtype)
    clip_tokenizer, t5_tokenizer = embedded_tokenizers()
    # FLUX.1 [dev] reads 512 T5 tokens; the embedded tokenizer declares its model's 32.
    t5_tokenizer.model_max_length = TEXT_TOKENS
    pipe = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


async def _time_job(engine: ThreadedEngine, job: Job) -> tuple[list[float], float]:
    started = time.perf_counter()
    step_times: list[float] = []
    async for event in engine.submit(job).events():
        if isinstance(event, Progress):
            step_times.append(time.perf_counter())
        elif isinstance(event, Result):
            encode_image(event.images[0], "png")
    return [b - a for a, b in itertools.pairwise(step_times)], time.perf_counter() - started


async def _measure(engine: ThreadedEngine, job: Job, repeats: int) -> Measurement:
    steps: list[float] = []
    images: list[float] = []
    for _ in range(repeats):
        step_times, image_s = await _time_job(engine, job)
        steps.extend(step_times)
        images.append(image_s)
    return Measurement(
        job.partial_images, statistics.median(steps) * 1000, statistics.median(images)
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_sweep(
    transformer: FluxTransformer2DModel, size: int, repeats: int = 20
) -> dict[str, float | str]:
    """Milliseconds per attention call of each diffusers backend, at this model's shape
    (image tokens plus T5's 512), so that `--attention-backend` is chosen by measurement."""
    heads = transformer.config.num_attention_heads
    head_dim = transformer.config.attention_head_dim
    tokens = (size // 16) ** 2 + TEXT_TOKENS
    device, dtype = transformer.device, transformer.dtype
    query, key, value = (
        torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype) for _ in range(3)
    )
    timings: dict[str, float | str] = {}
    for backend in ATTENTION_BACKENDS:
        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
            dispatch_attention_fn(query, key, value, backend=backend)
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats):
                dispatch_attention_fn(query, key, value, backend=backend)
            _synchronize(device)
            timings[backend] = (time.perf_counter() - started) / repeats * 1000
        except Exception as error:  # a backend that cannot run here is reported, not fatal
            timings[backend] = f"unavailable ({type(error).__name__})"
    return timings


def split_group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` from two plain reductions over a (batch, group, -1) view and one
    multiply-add. PyTorch's CUDA GroupNorm gives each (image, group) pair one thread block,
    32 blocks for one image on a 132-SM GPU: on an H200 its statistics kernel took 63 % of
    the VAE's 1024² decode, where a plain reduction spreads each group over many blocks."""
    batch, channels = x.shape[:2]
    grouped = x.reshape(batch, norm.num_groups, -1)
    mean = grouped.mean(dim=-1, dtype=torch.float32)
    square = torch.linalg.vector_norm(grouped, dim=-1, dtype=torch.float32).square()
    variance = (square / grouped.shape[-1] - mean.square()).clamp_min(0)
    per_group = channels // norm.num_groups
    rstd = torch.rsqrt(variance + norm.eps).repeat_interleave(per_group, dim=1)
    mean = mean.repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.float() if norm.affine else rstd
    shift = (norm.bias.float() if norm.affine else 0.0) - mean * scale
    shape = (batch, channels) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


@contextmanager
def group_norms_split(module: torch.nn.Module) -> Iterator[None]:
    """`module`'s GroupNorm layers run `split_group_norm` while inside."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    for norm in norms:
        norm.forward = partial(split_group_norm, norm)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def vae_decode_figures(
    pipe: FluxPipeline, size: int, repeats: int = 5
) -> tuple[dict[str, float], float]:
    """Milliseconds per VAE decode of one `size`² latent: in the default (NCHW) layout,
    channels-last (CUDA's GroupNorm works in NCHW, so channels-last may cost more than it
    saves: on an H200 it did), and with `split_group_norm`; and that variant's PSNR in dB
    against the default decode. Leaves the VAE contiguous and with its own GroupNorm, as
    the server uses it."""
    vae = pipe.vae
    side = size // pipe.vae_scale_factor
    latents = torch.randn(
        1, vae.config.latent_channels, side, side, device=vae.device, dtype=vae.dtype
    )
    variants: dict[str, tuple[torch.memory_format, AbstractContextManager[None]]] = {
        "channels_last": (torch.channels_last, nullcontext()),
        "contiguous": (torch.contiguous_format, nullcontext()),
        "split_group_norm": (torch.contiguous_format, group_norms_split(vae)),
    }
    timings, images = {}, {}
    for name, (layout, inside) in variants.items():
        vae.to(memory_format=layout)
        decoded = latents.contiguous(memory_format=layout)
        with torch.no_grad(), inside:
            pixels = (vae.decode(decoded).sample.float().clamp(-1, 1) + 1) * 127.5
            images[name] = pixels.cpu().numpy()
            _synchronize(vae.device)
            started = time.perf_counter()
            for _ in range(repeats):
                vae.decode(decoded)
            _synchronize(vae.device)
        timings[name] = (time.perf_counter() - started) / repeats * 1000
    vae.to(memory_format=torch.contiguous_format)
    return timings, psnr(images["split_group_norm"], images["contiguous"])


def _generate(pipe: FluxPipeline, job: Job) -> Any:
    return pipe(
        prompt=job.prompt,
        width=job.width,
        height=job.height,
        num_inference_steps=job.num_inference_steps,
        generator=torch.Generator().manual_seed(job.seeds[0]),
    ).images[0]


@dataclass(frozen=True)
class BenchLoras:
    """One random LoRA of the slot's rank, and two of half of it that fill the slot."""

    one: tuple[LoraRef, ...]
    two: tuple[LoraRef, ...]

    @classmethod
    def write(cls, transformer: torch.nn.Module, rank: int, folder: Path) -> BenchLoras:
        full, *halves = (
            random_lora(folder / f"lora-{seed}.safetensors", transformer, r, seed)
            for seed, r in enumerate((rank, rank // 2, rank // 2))
        )
        return cls((full,), tuple(halves))


async def lora_figures(
    engine: ThreadedEngine, runner: FluxRunner, job: Job, loras: BenchLoras, repeats: int
) -> dict[str, Any]:
    timed = {
        name: asdict(await _measure(engine, replace(job, loras=refs), repeats))
        for name, refs in (("1", loras.one), ("2", loras.two))
    }
    return {
        "measurements": timed,
        "switch_cached_ms": switch_ms(runner, loras.one, False, 10),
        "switch_from_disk_ms": switch_ms(runner, loras.one, True, 3),
    }


def profile_steps(runner: FluxRunner, job: Job, rows: int = 25) -> str:
    """The operators of a short job (three steps, after the engine has closed, so the
    model is warm and idle) by their device time: where a step's time goes."""
    device = runner.pipe.transformer.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    short = replace(job, num_inference_steps=3)
    with torch.profiler.profile(activities=activities) as profiler:
        runner.run(short, lambda event: None, lambda: False)
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table: str = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    return table


class Stages:
    """Lines on stderr as each stage of a run ends, with the seconds since it began: a run
    cut off by its time limit (a lent device's call) then still says how far it got and
    what took the time, where its results would have said nothing."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def done(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {what}", file=sys.stderr, flush=True)


async def _warm(engine: ThreadedEngine, stages: Stages, every_s: float = 15.0) -> None:
    """Wait for the engine's warm-up, saying every `every_s` how many graphs it compiled."""
    said = time.perf_counter()
    while engine.status == "warming":
        await asyncio.sleep(0.05)
        if time.perf_counter() - said >= every_s:
            said = time.perf_counter()
            stages.done(f"warming up: {counters['stats']['unique_graphs']} graphs compiled")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stages = Stages()
    device = torch.device("cpu") if args.tiny else resolve_device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-gpu-bench-"))
    if args.tiny:
        pipe, name = build_embedded_pipeline().to(device), "embedded (tiny)"
        pipe.set_progress_bar_config(disable=True)
    elif args.model:
        pipe, name = load_pipeline(ModelSpec(model=args.model, device=str(device))), args.model
    else:
        pipe, name = full_size_pipeline(device, dtype), "FLUX.1-dev architecture, random weights"
    stages.done(f"built {name} on {device}")
    attention_ms = attention_sweep(pipe.transformer, args.size)
    decode_ms, split_group_norm_psnr_db = vae_decode_figures(pipe, args.size)
    stages.done("attention backends and VAE decode timed")
    loras = BenchLoras.write(pipe.transformer, args.lora_rank, scratch) if args.lora_rank else None
    base_job = Job(
        prompt="a lighthouse at dusk, detailed, cinematic",
        width=args.size,
        height=args.size,
        seeds=(0,),
        num_inference_steps=args.steps,
        guidance_scale=3.5,
    )
    references: dict[str, Any] = {}
    if args.quantize != "none":
        references["plain"] = _generate(pipe, base_job)
        if loras is not None:
            with LoraManager(LoraBranches.of(pipe.transformer), LoraSpec()).applied(loras.one):
                references["lora"] = _generate(pipe, base_job)
        stages.done(f"reference images in {dtype} for the {args.quantize} comparison")
    speedups = Speedups(
        compile=args.compile,
        compile_backend=args.compile_backend,
        # LoRAs need Q, K and V apart, as the server's `--lora-dir` leaves them.
        fuse_qkv="off" if loras is not None else "auto",
        quantize=args.quantize,
        attention_backend=args.attention_backend,
    )
    if loras is not None and speedups.compiles(device):
        LoraSlot.inject(pipe, args.lora_rank)
    applied = apply_speedups(pipe, speedups, device, scratch)
    stages.done(f"speed-ups applied: {', '.join(applied) or 'none'}")
    # With the applied speed-ups, so that the warm-up compiles what requests will run.
    profile = model_profile("bench", pipe, applied)
    manager = None
    if loras is not None:
        manager = LoraManager(
            lora_target(pipe.transformer, runs_compiled(applied)),
            LoraSpec(max_rank=args.lora_rank),
        )
        profile = replace(profile, loras=True, lora_max_rank=manager.max_rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = FluxRunner(pipe, profile, {"linear": fit_linear_decoder(pipe.vae)}, loras=manager)
    started = time.perf_counter()
    engine = ThreadedEngine(
        runner, max_queued=4, warmup=warmup_jobs(profile, (args.size, args.size))
    )
    await _warm(engine, stages)
    warmup_s = time.perf_counter() - started
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    stages.done(f"warmed up in {warmup_s:.1f} s, {graphs_after_warmup} graphs compiled")
    _, first_after_ready_s = await _time_job(engine, base_job)
    # Another size and n than the warm-up's: a compiled model must not compile for it.
    other_shape = Job(**{**asdict(base_job), "width": args.size * 3 // 4, "seeds": (0, 1)})
    other_shape_s = [(await _time_job(engine, other_shape))[1] for _ in range(2)]
    measurements = [
        await _measure(engine, Job(**{**asdict(base_job), "partial_images": k}), args.repeats)
        for k in (0, 3)
    ]
    stages.done("steady images timed")
    with_loras = (
        None if loras is None else await lora_figures(engine, runner, base_job, loras, args.repeats)
    )
    if with_loras is not None:
        stages.done("LoRA figures")
    result: dict[str, Any] = {
        "model": name,
        "device": str(
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu"
        ),
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "speedups": list(applied),
        "attention_ms": attention_ms,
        "vae_decode_ms": decode_ms,
        "split_group_norm_psnr_db": split_group_norm_psnr_db,
        "warmup_s": warmup_s,
        "first_after_ready_ratio": first_after_ready_s / measurements[0].image_s,
        "other_shape_first_ratio": other_shape_s[0] / other_shape_s[1],
        "measurements": [asdict(m) for m in measurements],
        "previews_ratio": measurements[1].image_s / measurements[0].image_s,
        "graphs_compiled_after_warmup": counters["stats"]["unique_graphs"] - graphs_after_warmup,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }
    if with_loras is not None:
        result["loras"] = with_loras
    for name, reference in references.items():
        job = replace(base_job, loras=loras.one if name == "lora" and loras else ())
        events = [event async for event in engine.submit(job).events()]
        final = events[-1]
        assert isinstance(final, Result)
        key = "fp8_psnr_vs_bf16_db" if name == "plain" else "fp8_lora_psnr_vs_bf16_lora_db"
        result[key] = psnr(*(np.asarray(i, np.float64) for i in (final.images[0], reference)))
    await engine.aclose()
    if args.profile:
        result["profile"] = profile_steps(runner, base_job)
        stages.done("profiled")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="embedded model on the CPU, small")
    parser.add_argument("--model", help="real weights (local folder or cached hub id)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--quantize", choices=["none", "fp8", "fp8-torchao"], default="none")
    parser.add_argument("--attention-backend", help="a diffusers backend (default: SDPA's)")
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="also measure LoRAs (the slot's rank)"
    )
    parser.add_argument("--profile", action="store_true", help="also profile three steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (4 if args.tiny else 28)
    try:
        result = asyncio.run(run(args))
    except SpeedupError as error:
        raise SystemExit(f"bench.gpu: {error}") from None
    print(
        f"{result['model']} on {result['device']}, torch {result['torch']}, "
        f"{args.size}², {args.steps} steps; speed-ups: {', '.join(result['speedups']) or 'none'}"
    )
    print("attention backend | ms per call at this shape")
    for backend, timing in result["attention_ms"].items():
        print(f"{backend:>17} | {timing if isinstance(timing, str) else f'{timing:.2f}'}")
    print(f"warm-up (incl. compile): {result['warmup_s']:.1f} s")
    print(f"first request after ready / steady: {result['first_after_ready_ratio']:.2f}x")
    print(
        f"first request at {args.size * 3 // 4}x{args.size}, n=2 / the same again: "
        f"{result['other_shape_first_ratio']:.2f}x"
    )
    print("partial_images | step ms | image s (decode + PNG encode included)")
    for m in result["measurements"]:
        print(f"{m['partial_images']:>14} | {m['step_ms']:7.1f} | {m['image_s']:7.3f}")
    print(f"streaming with 3 previews / with 0: {result['previews_ratio']:.3f}x")
    print(f"graphs compiled after the warm-up: {result['graphs_compiled_after_warmup']}")
    if result["peak_gib"] is not None:
        print(f"peak GPU memory: {result['peak_gib']:.1f} GiB")
    print(
        "VAE decode ms: "
        + ", ".join(f"{variant} {ms:.1f}" for variant, ms in result["vae_decode_ms"].items())
        + f" (split_group_norm vs contiguous: PSNR {result['split_group_norm_psnr_db']:.1f} dB)"
    )
    if "loras" in result:
        figures = result["loras"]
        base = result["measurements"][0]
        print(f"LoRAs (rank {args.lora_rank} in all) | step ms | image s | step / no LoRA")
        for count, m in figures["measurements"].items():
            ratio = m["step_ms"] / base["step_ms"]
            print(f"{count:>21} | {m['step_ms']:7.1f} | {m['image_s']:7.3f} | {ratio:.3f}x")
        print(
            f"switch to a cached LoRA {figures['switch_cached_ms']:.1f} ms, "
            f"from disk {figures['switch_from_disk_ms']:.1f} ms"
        )
    if "fp8_psnr_vs_bf16_db" in result:
        print(f"fp8 output vs bf16, same seed: PSNR {result['fp8_psnr_vs_bf16_db']:.1f} dB")
    if "fp8_lora_psnr_vs_bf16_lora_db" in result:
        print(
            "fp8 + LoRA vs bf16 + LoRA, same seed: "
            f"PSNR {result['fp8_lora_psnr_vs_bf16_lora_db']:.1f} dB"
        )
    if "profile" in result:
        print(result["profile"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
