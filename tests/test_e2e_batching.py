"""Batching on the real embedded model: queued requests that share one pipeline call get
what each would have got alone, with their own previews and progress."""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.jobs import ContentFiltered, Job, Result
from pipeline.loading import ModelSpec
from pipeline.runner import FluxRunner
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.held import HeldRunner
from tests.servers import live_server
from tests.waiting import wait_until

REQUEST = {"size": "64x64", "num_inference_steps": 4, "partial_images": 2}


@pytest.fixture(scope="module")
def runner(model_cache: Path) -> FluxRunner:
    return create_flux_runner(ModelSpec(cache_dir=model_cache))


@pytest.fixture
def held(runner: FluxRunner) -> HeldRunner:
    return HeldRunner(runner)


@pytest.fixture
def engine(held: HeldRunner) -> ThreadedEngine:
    return ThreadedEngine(held, max_queued=4, max_batch_size=4)


@pytest.fixture
def server(engine: ThreadedEngine, tmp_path: Path) -> Iterator[str]:
    with live_server(create_app(make_settings(tmp_path), engine)) as url:
        yield url


def stream(base_url: str, prompt: str, seed: int) -> list[Any]:
    return list(
        sdk_client(base_url).images.generate(
            model="flux.1-dev",
            prompt=prompt,
            stream=True,
            extra_body={"seed": seed, **REQUEST},
        )
    )


def pixels(event: Any) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_two_queued_requests_share_one_call_and_each_gets_what_it_gets_alone(
    server: str, engine: ThreadedEngine, held: HeldRunner
) -> None:
    asked = {"a lighthouse at dusk": 11, "a red fox in snow": 22}
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(stream, server, "a bowl of fruit", 1)
        wait_until(lambda: engine.load().running == 1, "the first job to start")
        batched = [pool.submit(stream, server, prompt, seed) for prompt, seed in asked.items()]
        wait_until(lambda: engine.queued == 2, "two jobs to queue")
        held.gate.set()
        first.result()
        together = [future.result() for future in batched]
    assert held.calls == [1, 2]
    alone = [stream(server, prompt, seed) for prompt, seed in asked.items()]
    assert held.calls == [1, 2, 1, 1]
    for mine, solo, other in zip(together, alone, reversed(together), strict=True):
        assert [e.type for e in mine] == [e.type for e in solo]
        assert [e.model_extra.get("step") for e in mine[:2]] == [1, 3]
        # Previews and final image: those of the request run alone, up to float rounding
        # in batched CPU kernels (as for n > 1), and far from the other request's.
        for event, solo_event, other_event in zip(mine, solo, other, strict=True):
            assert np.abs(pixels(event) - pixels(solo_event)).max() <= 2
            assert np.abs(pixels(event) - pixels(other_event)).mean() > 5


class FlagAll:
    """A scripted checker that flags every image it sees."""

    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        return [True] * len(images)


def test_each_job_of_a_batch_is_safety_checked_as_it_asked(runner: FluxRunner) -> None:
    checked = runner.with_safety_checker(FlagAll())
    job = Job(
        prompt="x", width=64, height=64, seeds=(1,), num_inference_steps=2, guidance_scale=3.5
    )
    jobs = [dataclasses.replace(job, safety_check=True), dataclasses.replace(job, seeds=(2, 3))]
    outcomes = checked.run_batch(jobs, [lambda event: None] * 2, lambda: False)
    assert isinstance(outcomes[0], ContentFiltered)
    assert isinstance(outcomes[1], Result) and outcomes[1].seeds == (2, 3)
