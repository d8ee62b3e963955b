"""The official OpenAI SDK against a real server running the real diffusers pipeline."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pipeline.engine import Emit, StopRequested, ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.jobs import Event, Job, Preview, Result
from pipeline.loading import ModelSpec
from pipeline.runner import FluxRunner
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.images import decode_b64, pixels
from tests.servers import live_server


class GatedRunner:
    """The real runner, held after its first preview until the test opens the gate.

    While it is held the job cannot have finished, so a preview that reaches the client
    then proves that events are streamed one by one, not buffered until the end.
    """

    def __init__(self, runner: FluxRunner) -> None:
        self._runner = runner
        self.gate = threading.Event()

    @property
    def profile(self):  # type: ignore[no-untyped-def]
        return self._runner.profile

    def run(self, job: Job, emit: Emit, stop_requested: StopRequested) -> Result:
        def emit_then_hold(event: Event) -> None:
            emit(event)
            if isinstance(event, Preview) and event.index == 0:
                self.gate.wait(timeout=60)

        return self._runner.run(job, emit_then_hold, stop_requested)


@pytest.fixture(scope="module")
def gated_runner(model_cache: Path) -> GatedRunner:
    return GatedRunner(create_flux_runner(ModelSpec(cache_dir=model_cache)))


@pytest.fixture(scope="module")
def flux_server(
    gated_runner: GatedRunner, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    gated_runner.gate.set()
    settings = make_settings(tmp_path_factory.mktemp("server"))
    engine = ThreadedEngine(gated_runner, max_queued=8)
    with live_server(create_app(settings, engine)) as url:
        yield url


def test_stream_sends_k_partials_then_one_completed_with_images_of_the_requested_size(
    flux_server: str,
) -> None:
    client = sdk_client(flux_server)
    events = list(
        client.images.generate(
            model="flux.1-dev",
            prompt="a lighthouse at dusk",
            size="512x512",
            stream=True,
            partial_images=3,
            extra_body={"seed": 7},
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + [
        "image_generation.completed"
    ]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]  # type: ignore[union-attr]
    images = [decode_b64(e.b64_json) for e in events]
    assert all(image.size == (512, 512) for image in images)
    distinct = {pixels(image).tobytes() for image in images}
    assert len(distinct) == 4, "partials must differ from each other and from the final image"


def test_stream_partials_report_their_step(flux_server: str) -> None:
    events = list(
        sdk_client(flux_server).images.generate(
            model="flux.1-dev",
            prompt="a fox",
            size="256x256",
            stream=True,
            partial_images=3,
            extra_body={"num_inference_steps": 8},
        )
    )
    steps = [e.model_extra["step"] for e in events[:3]]  # type: ignore[index]
    assert steps == [2, 4, 6]
    assert {e.model_extra["total_steps"] for e in events[:3]} == {8}  # type: ignore[index]


@pytest.mark.parametrize("preview", ["linear", "vae"])
def test_stream_previews_with_the_requested_decoder_at_the_preview_size(
    flux_server: str, preview: str
) -> None:
    events = list(
        sdk_client(flux_server).images.generate(
            model="flux.1-dev",
            prompt="a fox",
            size="1024x512",
            stream=True,
            partial_images=2,
            extra_body={"num_inference_steps": 4, "preview": preview},
        )
    )
    assert [decode_b64(e.b64_json).size for e in events] == [(512, 256), (512, 256), (1024, 512)]


def test_plain_request_returns_the_same_final_image_as_the_stream_for_the_same_seed(
    flux_server: str,
) -> None:
    client = sdk_client(flux_server)
    streamed = list(
        client.images.generate(
            model="flux.1-dev",
            prompt="a lighthouse",
            size="512x512",
            stream=True,
            partial_images=2,
            extra_body={"seed": 1234},
        )
    )[-1]
    plain = client.images.generate(
        model="flux.1-dev",
        prompt="a lighthouse",
        size="512x512",
        response_format="b64_json",
        extra_body={"seed": 1234},
    )
    assert plain.data is not None and plain.data[0].b64_json is not None
    assert plain.size == "512x512"
    assert np.array_equal(
        pixels(decode_b64(plain.data[0].b64_json)), pixels(decode_b64(streamed.b64_json))
    )
    assert plain.data[0].model_extra == {"seed": 1234}


def test_first_partial_reaches_the_client_while_the_job_is_still_running(
    gated_runner: GatedRunner, flux_server: str
) -> None:
    gated_runner.gate.clear()
    try:
        stream = sdk_client(flux_server).images.generate(
            model="flux.1-dev",
            prompt="a lighthouse",
            size="256x256",
            stream=True,
            partial_images=3,
        )
        first = next(iter(stream))
        assert first.type == "image_generation.partial_image"
        assert not gated_runner.gate.is_set()  # the job is provably not finished
    finally:
        gated_runner.gate.set()
    rest = [event.type for event in stream]
    assert rest[-1] == "image_generation.completed"


def test_url_response_serves_the_image_file_with_its_content_type(flux_server: str) -> None:
    result = sdk_client(flux_server).images.generate(
        model="flux.1-dev", prompt="a city", size="320x200"
    )
    assert result.data is not None and result.data[0].url is not None
    download = httpx.get(result.data[0].url)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (320, 200)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"size": "512x512"}, "prompt"),
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "partial_images": 4, "stream": True}, "partial_images"),
        ({"prompt": "x", "partial_images": -1, "stream": True}, "partial_images"),
        ({"prompt": "x", "n": 2, "stream": True}, "n"),
        ({"prompt": "x", "preview": "fancy", "stream": True, "partial_images": 1}, "preview"),
    ],
)
def test_bad_request_is_an_openai_shaped_400_the_sdk_raises(
    flux_server: str, params: dict[str, object], param: str
) -> None:
    client = sdk_client(flux_server)
    with pytest.raises(openai.BadRequestError) as raised:
        client.post("/images/generations", body=params, cast_to=httpx.Response)
    error = raised.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_models_endpoint_lists_the_served_model(flux_server: str) -> None:
    models = sdk_client(flux_server).models.list()
    assert "flux.1-dev" in [model.id for model in models]
