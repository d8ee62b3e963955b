"""Load a FLUX pipeline: the embedded model, a local diffusers folder, or a cached hub id.

All three go through the same `from_pretrained` call, offline. Failures become one
`ModelLoadError` with a sentence a person can act on, never a traceback at start-up.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderTiny, FluxPipeline, FluxTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from pipeline import embedded
from pipeline.embedded import ensure_embedded_model
from pipeline.jobs import ModelProfile
from pipeline.loras import LoraSlot, LoraSpec
from pipeline.speedups import SpeedupError, Speedups, apply_speedups

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_KONTEXT = "embedded-kontext"
EMBEDDED_MODELS = (EMBEDDED, EMBEDDED_KONTEXT)
# 16 latent channels in 2x2 patches: what text-to-image and Kontext feed the transformer.
FLUX_INPUT_CHANNELS = 64
# Devices that offloading moves weights to; the tests add the CPU to run diffusers' real
# offloading hooks on a machine without a GPU.
OFFLOAD_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
_PIPELINE_T5_LENGTH = 512
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why in one line."""


@dataclass(frozen=True)
class ModelSpec:
    model: str = EMBEDDED
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path = Path.home() / ".cache" / "fluxstream"
    offload: Literal["none", "model", "sequential"] = "none"
    speedups: Speedups = field(default_factory=Speedups)
    tiny_vae: Path | None = None
    # Per-request LoRAs (`--lora-dir`); None: the model takes none.
    loras: LoraSpec | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved: torch.device | None = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but torch sees no CUDA device")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"--device {device} was asked for, but torch sees {torch.cuda.device_count()} "
            f"CUDA device(s), numbered from 0"
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def model_profile(model: str, pipe: FluxPipeline, speedups: tuple[str, ...] = ()) -> ModelProfile:
    """Per-model defaults: schnell is distilled for 4 steps without guidance, dev for 28.
    The embedded model draws best at the size it was trained on, reads short captions, and
    knows only its scene world, so it says so."""
    name = model.lower()
    if model in EMBEDDED_MODELS:
        steps, guidance = 8, 3.5
    elif "schnell" in name or not pipe.transformer.config.guidance_embeds:
        steps, guidance = 4, 0.0
    else:
        steps, guidance = 28, 3.5
    profile = ModelProfile(
        model_id=model,
        default_steps=steps,
        default_guidance=guidance,
        pipeline_parameters=frozenset(inspect.signature(pipe.__call__).parameters),
        speedups=speedups,
        max_sequence_length=t5_length(pipe),
    )
    if model not in EMBEDDED_MODELS:
        return profile
    return dataclasses.replace(
        profile,
        default_size=embedded.DEFAULT_SIZE,
        example_prompts=embedded.scenes.EXAMPLE_PROMPTS,
    )


def t5_length(pipe: FluxPipeline) -> int | None:
    """The T5 length the model's tokenizer declares when it is shorter than the pipeline's
    default (512): the embedded model was trained on 32 tokens and draws noise from 512."""
    length = getattr(pipe.tokenizer_2, "model_max_length", None)
    return length if isinstance(length, int) and length < _PIPELINE_T5_LENGTH else None


def _quiet_libraries() -> None:
    """Progress bars and torchvision notices from loading are noise in a server log, and so
    is the deprecation warning huggingface_hub gives for what diffusers' `load_config` passes."""
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def model_source(spec: ModelSpec) -> Path | str:
    """Where `from_pretrained` finds the model: an embedded model's cache folder (built on
    first use), a local diffusers folder, or a hub id."""
    if spec.model in EMBEDDED_MODELS:
        try:
            return ensure_embedded_model(spec.cache_dir, kontext=spec.model == EMBEDDED_KONTEXT)
        except OSError as error:
            raise ModelLoadError(
                f"cannot build the embedded model in the cache folder {spec.cache_dir}: "
                f"{error.strerror}"
            ) from error
    folder = Path(spec.model).expanduser()  # `~` from a quoted flag or an env variable
    if not folder.exists():
        # A hub id is `owner/name`; anything else can only be a mistyped path.
        if spec.model.startswith(("/", ".", "~")) or spec.model.count("/") > 1:
            raise ModelLoadError(f"could not load model {spec.model!r}: there is no such folder")
        return spec.model
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{spec.model} is not a diffusers folder (no model_index.json)")
    return folder


def _check_servable(spec: ModelSpec, source: Path | str) -> None:
    """Refuse, before loading any weights, what would fail every request: another kind of
    pipeline, or a FLUX variant whose transformer needs conditioning inputs that text-to-image
    has not (Fill, Canny, Depth). Reads only configs; raises `OSError` where they are missing."""
    pipeline = str(FluxPipeline.load_config(source, local_files_only=True).get("_class_name"))
    if not pipeline.startswith("Flux"):
        raise ModelLoadError(f"{spec.model} holds a {pipeline}, not a FLUX model")
    transformer = FluxTransformer2DModel.load_config(
        source, subfolder="transformer", local_files_only=True
    )
    channels = transformer.get("in_channels")
    if channels != FLUX_INPUT_CHANNELS:
        raise ModelLoadError(
            f"{spec.model} holds a {pipeline}, whose transformer takes {channels} input "
            f"channels; fluxstream serves FLUX text-to-image and Kontext models "
            f"({FLUX_INPUT_CHANNELS})"
        )


def is_kontext_model(spec: ModelSpec) -> bool:
    """A Kontext model names its pipeline class in model_index.json; its components are
    FLUX's, so it loads as a `FluxPipeline` and edits by reference with FluxKontextPipeline."""
    config = FluxPipeline.load_config(model_source(spec), local_files_only=True)
    return str(config.get("_class_name", "")).startswith("FluxKontext")


def read_pipeline(spec: ModelSpec) -> FluxPipeline:
    """Load `spec`'s weights into CPU memory, in its dtype, not yet placed on its device."""
    _quiet_libraries()
    device = resolve_device(spec.device)
    _check_offload(spec, device)
    dtype = resolve_dtype(spec.dtype, device)
    source = model_source(spec)
    try:
        _check_servable(spec, source)
        pipe = FluxPipeline.from_pretrained(source, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load model {spec.model!r} offline: give a local diffusers folder or "
            f"a hub id that is already in the local Hugging Face cache ({type(error).__name__})"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(spec: ModelSpec) -> FluxPipeline:
    """Load `spec` and place it on its device (or set up its offloading), without speed-ups."""
    pipe = read_pipeline(spec)
    _place(pipe, spec, resolve_device(spec.device))
    return pipe


def prepare_pipeline(spec: ModelSpec) -> tuple[FluxPipeline, tuple[str, ...]]:
    """Load `spec`, place it and apply its speed-ups; returns the pipeline and what was
    applied."""
    pipe = read_pipeline(spec)
    return pipe, place_pipeline(pipe, spec)


def place_pipeline(pipe: FluxPipeline, spec: ModelSpec) -> tuple[str, ...]:
    """Place a `read_pipeline` result on its device (or offload it) and apply its speed-ups;
    returns what was applied. What must read the weights in CPU memory (the preview fit and
    its cache key) runs before this: sequential offload leaves them on the meta device."""
    device = resolve_device(spec.device)
    speedups = startup_speedups(spec)
    _place(pipe, spec, device)
    if spec.loras is not None and speedups.compiles(device):
        LoraSlot.inject(pipe, spec.loras.max_rank)  # before fp8 and compile: pipeline.loras
    try:
        return apply_speedups(pipe, speedups, device, spec.cache_dir)
    except SpeedupError as error:
        raise ModelLoadError(str(error)) from None


def startup_speedups(spec: ModelSpec) -> Speedups:
    """`--compile auto` leaves an offloaded model uncompiled: offloading moves the weights
    between devices at every call, which compiled blocks do not survive. Sequential offload
    keeps the weights on the meta device between calls, where fusing or quantizing them
    at start-up cannot work: `auto` fusion is off there, and asking for either is refused."""
    speedups = spec.speedups
    if spec.offload != "none" and speedups.compile == "auto":
        speedups = dataclasses.replace(speedups, compile="off")
    if spec.loras is not None:
        speedups = _lora_speedups(spec, speedups)
    if spec.offload != "sequential":
        return speedups
    if speedups.fuse_qkv == "on" or speedups.quantize != "none":
        raise ModelLoadError(
            "--offload sequential cannot be combined with --fuse-qkv on or --quantize: it "
            "keeps the weights on the meta device; use --offload model for those"
        )
    return dataclasses.replace(speedups, fuse_qkv="off")


def _lora_speedups(spec: ModelSpec, speedups: Speedups) -> Speedups:
    """LoRAs target Q, K and V apart; with fused QKV, attention reads `to_qkv` only and
    their Q/K/V parts would be silently lost, so `auto` leaves QKV unfused with LoRAs. The
    slot cannot wrap weights that sequential offload keeps on the meta device."""
    if speedups.fuse_qkv == "on":
        raise ModelLoadError(
            "--fuse-qkv on cannot be combined with --lora-dir: attention would read the fused "
            "projection and lose the LoRAs' Q/K/V parts; use --fuse-qkv auto or off"
        )
    if spec.offload == "sequential":
        raise ModelLoadError(
            "--offload sequential cannot be combined with --lora-dir: it keeps the weights "
            "on the meta device; use --offload model"
        )
    return dataclasses.replace(speedups, fuse_qkv="off")


def _check_offload(spec: ModelSpec, device: torch.device) -> None:
    """Refuse an offload that cannot work before any weights load or previews are fitted."""
    startup_speedups(spec)  # refuses fused QKV or fp8 with sequential offload
    if spec.offload == "none":
        return
    if device.type not in OFFLOAD_DEVICE_TYPES:
        raise ModelLoadError(
            f"--offload {spec.offload} moves weights between the CPU and a GPU; "
            f"with device {device} there is nothing to offload to"
        )
    if spec.speedups.compile == "on":
        raise ModelLoadError("--offload cannot be combined with --compile on")


def _place(pipe: FluxPipeline, spec: ModelSpec, device: torch.device) -> None:
    """Move the pipeline to its device, or set up offloading; refuse what cannot fit."""
    if spec.offload != "none":
        if spec.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        logger.info("loaded %s offloaded to %s (%s)", spec.model, device, spec.offload)
        return
    if device.type == "cuda":
        _check_fits(pipe, device)
    pipe.to(device)
    logger.info("loaded %s on %s as %s", spec.model, device, pipe.transformer.dtype)


def _check_fits(pipe: FluxPipeline, device: torch.device) -> None:
    """Fail at start-up, not with an out-of-memory traceback in the middle of a request."""
    needed = sum(
        parameter.numel() * parameter.element_size()
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
        for parameter in component.parameters()
    )
    free, _total = torch.cuda.mem_get_info(device)
    # Activations at 1024x1024 need a few GiB on top of the weights (44 GiB peak for dev).
    if needed * 1.1 + 4 * 2**30 > free:
        raise ModelLoadError(
            f"the model needs about {needed / 2**30:.1f} GiB of weights plus working memory, "
            f"but {device} has {free / 2**30:.1f} GiB free; try --offload model"
        )


def load_tiny_vae(folder: Path, pipe: FluxPipeline) -> AutoencoderTiny:
    """A TAEF1-style `AutoencoderTiny` from a local diffusers folder, beside `pipe`'s VAE."""
    try:
        tiny = AutoencoderTiny.from_pretrained(folder, dtype=pipe.vae.dtype, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the tiny preview VAE from {folder}: give a local diffusers "
            f"AutoencoderTiny folder such as TAEF1 ({type(error).__name__})"
        ) from error
    if tiny.config.latent_channels != pipe.vae.config.latent_channels:
        raise ModelLoadError(
            f"the tiny preview VAE in {folder} has {tiny.config.latent_channels} latent "
            f"channels; the model has {pipe.vae.config.latent_channels}"
        )
    # Where the pipeline runs, not `pipe.vae.device`: offloading leaves the VAE on the CPU
    # or the meta device between calls.
    return tiny.to(pipe._execution_device)
