"""A scripted engine for fast HTTP tests: same seam as the real one, no model behind it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from pipeline.engine import Emit, StopRequested
from pipeline.jobs import (
    EngineError,
    EngineLoad,
    EngineStatus,
    Event,
    Job,
    JobCancelled,
    ModelProfile,
    Preview,
    Progress,
    QueueFull,
    Result,
)

# A few keywords of FluxPipeline.__call__, safe and unsafe, for pass-through tests.
PROFILE = ModelProfile(
    model_id="fake",
    default_steps=4,
    default_guidance=3.5,
    pipeline_parameters=frozenset(
        {
            "prompt",
            "negative_prompt",
            "true_cfg_scale",
            "max_sequence_length",
            "latents",
            "generator",
            "output_type",
            "callback_on_step_end",
            "prompt_embeds",
        }
    ),
)


def picture(size: tuple[int, int], value: int) -> Image.Image:
    """A picture that depends on `value` only, with gradients in it, so that encoders'
    quality settings change its size as they would on a real image."""
    ramp = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", (ramp, ramp.rotate(90), Image.new("L", size, value)))


def scripted_events(job: Job) -> list[Event | EngineError]:
    """What a well-behaved engine emits: progress every step, previews, then the result."""
    events: list[Event | EngineError] = []
    for step in range(1, job.num_inference_steps + 1):
        events.append(Progress(step, job.num_inference_steps))
        if step <= job.partial_images:
            events.append(
                Preview(
                    step - 1, step, job.num_inference_steps, picture(job.preview_size, 40 * step)
                )
            )
    images = tuple(picture((job.width, job.height), seed % 256) for seed in job.seeds)
    events.append(Result(images=images, seeds=job.seeds))
    return events


def opened() -> threading.Event:
    gate = threading.Event()
    gate.set()
    return gate


@dataclass
class FakeHandle:
    """Plays its script; holds before the `Result` until `release` is set (from any thread)."""

    script: Sequence[Event | EngineError]
    delay_s: float = 0.0
    release: threading.Event = field(default_factory=opened)
    cancelled: bool = False

    async def events(self) -> AsyncIterator[Event]:
        for item in self.script:
            await asyncio.sleep(self.delay_s)
            if isinstance(item, EngineError):
                raise item
            while isinstance(item, Result) and not self.release.is_set():
                await asyncio.sleep(0.01)
            yield item

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeEngine:
    """Records submitted jobs; `script` overrides the events, `full` makes submit refuse,
    and clearing `release` holds every job before its result."""

    script: Sequence[Event | EngineError] | None = None
    full: bool = False
    delay_s: float = 0.0
    release: threading.Event = field(default_factory=opened)
    jobs: list[Job] = field(default_factory=list)
    handles: list[FakeHandle] = field(default_factory=list)
    closed: bool = False
    profile: ModelProfile = PROFILE

    @property
    def status(self) -> EngineStatus:
        return "closed" if self.closed else "ok"

    def load(self) -> EngineLoad:
        return EngineLoad(queued=0, running=0)

    def loaded_loras(self) -> frozenset[str]:
        return frozenset()

    def submit(self, job: Job) -> FakeHandle:
        if self.full:
            raise QueueFull(retry_after_s=7.2)
        self.jobs.append(job)
        handle = FakeHandle(
            self.script if self.script is not None else scripted_events(job),
            self.delay_s,
            self.release,
        )
        self.handles.append(handle)
        return handle

    async def aclose(self, grace_s: float = 0.0) -> None:
        self.closed = True


class StepRunner:
    """A model-free `BatchRunner` for the real `ThreadedEngine`: one Progress per step, a
    preview at the first steps, then pictures. Each step waits for `release` when it
    is given (so a test can hold a job running) and then for `step_delay_s`. `calls`
    lists the jobs of each call, in order."""

    profile = PROFILE

    def __init__(
        self, release: threading.Event | None = None, fail: bool = False, step_delay_s: float = 0
    ) -> None:
        self.release = release
        self.fail = fail
        self.step_delay_s = step_delay_s
        self.steps_run = 0
        self.calls: list[list[Job]] = []

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        (result,) = self.run_batch([job], [emit], stop_requested)
        return result

    def run_batch(
        self, jobs: Sequence[Job], emits: Sequence[Emit], stop_requested: StopRequested
    ) -> list[Result]:
        self.calls.append(list(jobs))
        if self.fail:
            raise RuntimeError("/secret/path exploded")
        total = jobs[0].num_inference_steps
        for step in range(1, total + 1):
            if self.release is not None:
                self.release.wait(timeout=10)
            time.sleep(self.step_delay_s)
            if stop_requested():
                raise JobCancelled("cancelled")
            self.steps_run += 1
            for job, emit in zip(jobs, emits, strict=True):
                emit(Progress(step, total))
                if step <= job.partial_images:
                    emit(Preview(step - 1, step, total, picture(job.preview_size, 9)))
        return [
            Result(
                images=tuple(picture((job.width, job.height), seed % 256) for seed in job.seeds),
                seeds=job.seeds,
            )
            for job in jobs
        ]
