"""The seam between the HTTP side and the model side.

A `Job` goes in, an async stream of `Progress`, `Preview` and `Result` events comes out.
This module imports neither torch nor diffusers, so `stream/` can depend on it freely.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image

Acceleration = Literal["none", "regular", "high"]


@dataclass(frozen=True)
class EditInputs:
    """What an edit starts from, decoded by the HTTP side (PIL, so this module stays torch-free).

    `images` are RGB at their own size; the runner resizes them to the job's size. `mask`,
    when given, is an "L" image the size of `images[0]`: 255 where the picture may change, 0
    where it must stay (diffusers' convention; OpenAI's alpha-0 masks are converted before).
    `strength` 0 returns the input unchanged, 1 regenerates fully.
    """

    images: tuple[Image.Image, ...]
    mask: Image.Image | None = None
    strength: float = 1.0


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a job. `name` is what the request called it (and what is echoed back);
    `file` the safetensors file the HTTP side checked, inside the server's LoRA folder;
    `version` its (size, mtime_ns), so that a file replaced on disk is read again. The file
    "" is the warm-up's blank LoRA: the LoRA branch switched on with zero weights."""

    name: str
    file: str
    scale: float = 1.0
    version: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA that ran, as the response echoes it; `not_applied` names the parts of its
    file that were not (a text encoder's: only the transformer takes LoRAs here)."""

    name: str
    scale: float
    not_applied: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """One pipeline call, fully resolved: no defaults are left for the engine to guess.

    `width` and `height` are what the pipeline generates (multiples of 16); the HTTP side
    resizes to the exact size the user asked for.
    """

    prompt: str
    width: int
    height: int
    seeds: tuple[int, ...]
    num_inference_steps: int
    guidance_scale: float
    partial_images: int = 0
    preview_size: tuple[int, int] = (512, 512)
    preview_decoder: str = "linear"
    pipeline_kwargs: Mapping[str, object] = field(default_factory=dict)
    acceleration: Acceleration = "none"
    go_fast: bool = False
    safety_check: bool = False
    edit: EditInputs | None = None
    # Active for this job only, in this order; jobs share a call only with the same LoRAs.
    loras: tuple[LoraRef, ...] = ()

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class Queued:
    """The job waits behind `position - 1` others (1 = next); sent on submit when the
    worker is busy, and on change. `estimated_wait_s` comes from the run times measured so
    far, so it is None until a job has finished."""

    position: int
    estimated_wait_s: float | None


@dataclass(frozen=True)
class Started:
    """The worker took the job after it waited `queue_wait_s` seconds in the queue."""

    queue_wait_s: float


@dataclass(frozen=True)
class Progress:
    """A denoising step finished (1-based `step` of `total_steps`)."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class Preview:
    """A small RGB image of what the first image of the job looks like at `step`."""

    index: int
    step: int
    total_steps: int
    image: Image.Image


@dataclass(frozen=True)
class Result:
    """The finished images that passed the safety check, in the order of `Job.seeds`.

    `acceleration` is the speed-up that actually ran and `speedup` says how, in words
    (for example what `go_fast` fell back to); `filtered` counts images withheld by the
    safety checker.
    """

    images: tuple[Image.Image, ...]
    seeds: tuple[int, ...]
    acceleration: Acceleration = "none"
    speedup: str = "none"
    filtered: int = 0
    loras: tuple[AppliedLora, ...] = ()


Event = Queued | Started | Progress | Preview | Result


class EngineError(Exception):
    """Base of everything the engine raises towards its callers."""


class QueueFull(EngineError):
    """The engine's queue is at capacity; the caller should retry after `retry_after_s`
    (None: no job has finished yet to estimate it from)."""

    def __init__(self, retry_after_s: float | None) -> None:
        super().__init__("the engine queue is full")
        self.retry_after_s = retry_after_s


class EngineClosed(EngineError):
    """The engine is shutting down and takes no new jobs."""


class JobCancelled(EngineError):
    """The job was cancelled before it finished."""


class JobFailed(EngineError):
    """The pipeline raised while running the job; the message is safe to show users."""


class ContentFiltered(EngineError):
    """The safety checker flagged every image of the job, so there is nothing to return."""


class JobRejected(EngineError):
    """The pipeline refused the job's parameters before its first step (for example a
    passed-through keyword out of its range); the message is safe to show users."""


class InvalidLora(JobRejected):
    """A LoRA of the job could not be loaded or does not fit the model (a corrupt file, a
    LoRA for another model, a rank past the compiled slot's); the message is safe to show
    users and names the LoRA as the request did."""


class QueueTimeout(EngineError):
    """The job waited in the queue longer than the server allows, and never ran; a new job
    would wait about `retry_after_s` (None: unknown, as for `QueueFull`)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobTimedOut(EngineError):
    """The job ran longer than the server allows and was stopped at a step boundary."""


class JobHandle(Protocol):
    def events(self) -> AsyncIterator[Event]:
        """Events of this job, ending with a `Result` or raising an `EngineError`."""
        ...

    def cancel(self) -> None:
        """Stop the job: a queued job never runs, a running one stops at its next step."""
        ...


@dataclass(frozen=True)
class EngineLoad:
    """How busy the engine is right now, for metrics."""

    queued: int
    running: int


@dataclass(frozen=True)
class ModelProfile:
    """What the HTTP side needs to know about the loaded model to resolve requests."""

    model_id: str
    default_steps: int
    default_guidance: float
    pipeline_parameters: frozenset[str] = frozenset()
    speedups: tuple[str, ...] = ()
    safety_checker: bool = False
    preview_decoders: tuple[str, ...] = ("linear", "vae")
    # What `preview: auto` means: a tiny VAE given at start-up, else the linear map.
    auto_preview: str = "linear"
    max_input_images: int = 1
    # What a request that names no size gets (FLUX's 1K square; the embedded model's 256).
    default_size: tuple[int, int] = (1024, 1024)
    # T5 tokens the pipeline reads; None keeps the pipeline's own default (512 for FLUX).
    max_sequence_length: int | None = None
    # Prompts the demo page offers a newcomer: what this model draws well.
    example_prompts: tuple[str, ...] = ()
    # Whether the model takes per-request LoRAs, and the largest rank (summed over one
    # request's LoRAs) a compiled model's LoRA slot holds; None: no limit.
    loras: bool = False
    lora_max_rank: int | None = None


EngineStatus = Literal["warming", "ok", "failed", "draining", "closed"]


class ImageEngine(Protocol):
    @property
    def profile(self) -> ModelProfile: ...

    @property
    def status(self) -> EngineStatus:
        """`warming` until the start-up generation is done, then `ok`; `draining` from the
        start of a graceful shutdown (no new jobs), `closed` once it is done."""
        ...

    def submit(self, job: Job) -> JobHandle:
        """Queue a job; raises `QueueFull` or `EngineClosed` instead of blocking."""
        ...

    def load(self) -> EngineLoad: ...

    def loaded_loras(self) -> frozenset[str]:
        """The LoRA files (`LoraRef.file`) loaded and cached right now."""
        ...

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Stop taking jobs at once; give accepted jobs `grace_s` seconds to finish, then
        fail what is left with `EngineClosed` and wait for the worker to stop."""
        ...
