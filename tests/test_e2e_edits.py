"""Edits end to end: the official SDK against a real server on the embedded models (plain
FLUX for img2img and inpainting, its Kontext-shaped twin for reference editing)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import openai
import pytest
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    FluxKontextPipeline,
)
from PIL import Image

from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.jobs import EditInputs, Job
from pipeline.loading import EMBEDDED_KONTEXT, ModelSpec
from pipeline.runner import FluxRunner
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.images import decode_b64, encoded, hole_mask, noise_image, pixels, scene_image
from tests.servers import live_server

SIZE = (128, 96)
PICTURE = noise_image(SIZE, seed=3)
PNG = encoded(PICTURE)
FAST = {"num_inference_steps": 4, "seed": 5}


@pytest.fixture(scope="module")
def flux_runner(model_cache: Path) -> FluxRunner:
    return create_flux_runner(ModelSpec(cache_dir=model_cache))


@pytest.fixture(scope="module")
def kontext_runner(model_cache: Path) -> FluxRunner:
    return create_flux_runner(ModelSpec(model=EMBEDDED_KONTEXT, cache_dir=model_cache))


def serve(runner: FluxRunner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = make_settings(tmp_path_factory.mktemp("server"))
    with live_server(create_app(settings, ThreadedEngine(runner, max_queued=8))) as url:
        yield url


@pytest.fixture(scope="module")
def flux_server(flux_runner: FluxRunner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(flux_runner, tmp_path_factory)


@pytest.fixture(scope="module")
def kontext_server(
    kontext_runner: FluxRunner, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from serve(kontext_runner, tmp_path_factory)


def edit(base_url: str, **arguments: object) -> openai.types.ImagesResponse:
    extra = {**FAST, **arguments.pop("extra_body", {})}  # type: ignore[dict-item]
    return sdk_client(base_url).images.edit(  # type: ignore[call-overload]
        image=arguments.pop("image", ("photo.png", PNG, "image/png")),
        prompt="a red fox in the snow",
        response_format="b64_json",
        size=f"{SIZE[0]}x{SIZE[1]}",
        extra_body=extra,
        **arguments,
    )


def only_image(result: openai.types.ImagesResponse) -> np.ndarray:
    assert result.data is not None and result.data[0].b64_json is not None
    return pixels(decode_b64(result.data[0].b64_json))


def test_every_edit_mode_shares_the_loaded_weights(
    flux_runner: FluxRunner, kontext_runner: FluxRunner
) -> None:
    for runner, classes in [
        (flux_runner, (FluxImg2ImgPipeline, FluxInpaintPipeline)),
        (kontext_runner, (FluxKontextPipeline, FluxKontextInpaintPipeline)),
    ]:
        for masked, cls in zip((False, True), classes, strict=True):
            edit_pipe = runner.edit_pipe(masked)
            assert type(edit_pipe) is cls
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
                assert getattr(edit_pipe, name) is getattr(runner.pipe, name)


def test_img2img_returns_a_changed_image_of_the_requested_size_with_its_seed(
    flux_server: str,
) -> None:
    result = edit(flux_server, image=[("photo.png", PNG, "image/png")])
    output = only_image(result)
    assert output.shape == (SIZE[1], SIZE[0], 3)
    assert np.abs(output - pixels(PICTURE)).mean() > 5
    assert result.data is not None and result.data[0].model_extra == {"seed": 5}


def test_img2img_is_reproducible_with_its_seed(flux_server: str) -> None:
    assert np.array_equal(only_image(edit(flux_server)), only_image(edit(flux_server)))


def test_strength_zero_returns_the_input_unchanged(flux_server: str) -> None:
    output = only_image(edit(flux_server, extra_body={"strength": 0}))
    assert np.array_equal(output, pixels(PICTURE))


def test_streamed_strength_zero_sends_the_input_as_the_completed_image(
    kontext_server: str,
) -> None:
    events = list(
        sdk_client(kontext_server).images.edit(
            image=("photo.png", PNG, "image/png"),
            prompt="make it night",
            size="128x96",
            stream=True,
            partial_images=2,
            extra_body={"strength": "0"},
        )
    )
    assert [event.type for event in events] == ["image_edit.completed"]
    assert np.array_equal(pixels(decode_b64(events[0].b64_json)), pixels(PICTURE))


def test_lower_strength_stays_closer_to_the_input(flux_server: str) -> None:
    """On a picture of the embedded model's world: its VAE was trained on scenes, so noise
    comes back from it changed whatever the strength."""
    scene = scene_image(SIZE)

    def distance(strength: float) -> float:
        upload = ("scene.png", encoded(scene), "image/png")
        output = only_image(edit(flux_server, image=upload, extra_body={"strength": strength}))
        return float(np.abs(output - pixels(scene)).mean())

    assert distance(0.25) < distance(1.0)


def test_inpainting_changes_the_masked_area_and_keeps_every_other_pixel(
    flux_server: str,
) -> None:
    box = (32, 16, 96, 64)
    mask = encoded(hole_mask(SIZE, box))
    output = only_image(edit(flux_server, mask=("mask.png", mask, "image/png")))
    inside = np.zeros(output.shape[:2], dtype=bool)
    inside[box[1] : box[3], box[0] : box[2]] = True
    difference = np.abs(output - pixels(PICTURE))
    assert difference[~inside].max() <= 2
    assert difference[inside].mean() > 5


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpainting"])
def test_each_image_of_an_edit_with_n2_is_the_image_its_seed_gives_alone(
    flux_server: str, masked: bool
) -> None:
    mask = {"mask": ("mask.png", encoded(hole_mask(SIZE, (32, 16, 96, 64))), "image/png")}
    options = mask if masked else {}
    both = edit(flux_server, n=2, **options)
    assert both.data is not None
    for item in both.data:
        assert item.b64_json is not None and item.model_extra is not None
        alone = only_image(
            edit(flux_server, extra_body={"seed": item.model_extra["seed"]}, **options)
        )
        # Batched CPU kernels may round differently, by a level or two; another seed's
        # starting latent differs by far more.
        assert np.abs(pixels(decode_b64(item.b64_json)) - alone).max() <= 2


def test_streamed_img2img_previews_are_spread_over_the_steps_actually_run(
    flux_server: str,
) -> None:
    events = list(
        sdk_client(flux_server).images.edit(
            image=[("photo.png", PNG, "image/png")],
            prompt="a red fox",
            size="128x96",
            stream=True,
            partial_images=2,
            extra_body={"num_inference_steps": 8, "strength": 0.5, "seed": 1},
        )
    )
    assert [event.type for event in events] == ["image_edit.partial_image"] * 2 + [
        "image_edit.completed"
    ]
    # strength 0.5 of 8 steps runs the last 4; previews after steps 1 and 3 of those 4.
    assert [e.model_extra["total_steps"] for e in events[:2]] == [4, 4]  # type: ignore[index]
    assert [e.model_extra["step"] for e in events[:2]] == [1, 3]  # type: ignore[index]
    images = [pixels(decode_b64(event.b64_json)) for event in events]
    assert all(image.shape == (96, 128, 3) for image in images)
    assert len({image.tobytes() for image in images}) == 3


@pytest.mark.parametrize("preview", ["linear", "vae"])
def test_streamed_inpainting_previews_keep_the_unmasked_pixels(
    flux_server: str, preview: str
) -> None:
    box = (0, 0, 64, 96)
    smooth = noise_image((8, 6)).resize(SIZE, Image.Resampling.BICUBIC)  # JPEG keeps it well
    events = list(
        sdk_client(flux_server).images.edit(
            image=("photo.png", encoded(smooth), "image/png"),
            mask=("mask.png", encoded(hole_mask(SIZE, box)), "image/png"),
            prompt="a red fox",
            size="128x96",
            stream=True,
            partial_images=1,
            output_format="png",
            extra_body={**FAST, "preview": preview},
        )
    )
    partial, completed = (pixels(decode_b64(event.b64_json)) for event in events)
    assert np.abs(completed[:, 64:] - pixels(smooth)[:, 64:]).max() <= 2
    # Previews are JPEG: the kept half matches the input up to compression noise.
    assert np.abs(partial[:, 72:] - pixels(smooth)[:, 72:]).mean() < 4


def test_kontext_model_edits_by_reference_and_streams(kontext_server: str) -> None:
    events = list(
        sdk_client(kontext_server).images.edit(
            image=("photo.png", PNG, "image/png"),
            prompt="make it night",
            size="128x96",
            stream=True,
            partial_images=1,
            extra_body=FAST,
        )
    )
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert pixels(decode_b64(events[-1].b64_json)).shape == (96, 128, 3)


@pytest.mark.parametrize("kontext", [False, True], ids=["flux", "kontext"])
def test_a_saved_diffusers_folder_loads_by_path_and_edits_as_its_model_does(
    flux_runner: FluxRunner,
    kontext_runner: FluxRunner,
    model_cache: Path,
    tmp_path: Path,
    kontext: bool,
) -> None:
    runner = kontext_runner if kontext else flux_runner
    (runner.edit_pipe(False) if kontext else runner.pipe).save_pretrained(tmp_path / "model")
    loaded = create_flux_runner(ModelSpec(model=str(tmp_path / "model"), cache_dir=model_cache))
    assert type(loaded.edit_pipe(False)) is type(runner.edit_pipe(False))
    job = Job(
        prompt="a red fox",
        width=64,
        height=64,
        seeds=(5,),
        num_inference_steps=2,
        guidance_scale=3.5,
        edit=EditInputs(images=(PICTURE,), strength=0.8),
    )
    (image,) = loaded.run(job, lambda event: None, lambda: False).images
    (expected,) = runner.run(job, lambda event: None, lambda: False).images
    # The shipped weights are float16 on disk and the copy float32: the same values, laid
    # out apart in memory, which CPU kernels may round differently by one level.
    assert np.abs(pixels(image) - pixels(expected)).max() <= 1


def test_kontext_model_refuses_several_images_with_a_400_that_says_so(
    kontext_server: str,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        edit(kontext_server, image=[("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")])
    error = raised.value.response.json()["error"]
    assert error["param"] == "image"
    assert "accepts 1 input image; got 2" in error["message"]


def test_kontext_inpainting_keeps_the_unmasked_pixels(kontext_server: str) -> None:
    mask = encoded(hole_mask(SIZE, (0, 0, 64, 48)))
    output = only_image(edit(kontext_server, mask=("mask.png", mask, "image/png")))
    assert np.abs(output[48:] - pixels(PICTURE)[48:]).max() <= 2


def test_node_sdk_edits_with_one_image_a_list_a_mask_and_a_stream(
    node_sdk: Path, flux_server: str, tmp_path: Path
) -> None:
    (tmp_path / "photo.png").write_bytes(PNG)
    (tmp_path / "mask.png").write_bytes(encoded(hole_mask(SIZE, (0, 0, 64, 96))))
    run = subprocess.run(
        [
            "node",
            "edits.mjs",
            f"{flux_server}/v1",
            str(tmp_path / "photo.png"),
            str(tmp_path / "mask.png"),
        ],
        cwd=node_sdk,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    single, listed, masked = (pixels(decode_b64(out[key])) for key in ("single", "list", "masked"))
    assert single.shape == (96, 128, 3) and out["seed"] == 5
    assert np.array_equal(single, listed)  # `image[]` with one file is the same request
    assert np.abs(masked[:, 64:] - pixels(PICTURE)[:, 64:]).max() <= 2
    assert out["events"] == [
        {"type": "image_edit.partial_image", "index": 0},
        {"type": "image_edit.partial_image", "index": 1},
        {"type": "image_edit.completed", "index": None},
    ]
    assert out["refused"] == {"status": 400, "param": "image"}


def test_generation_parameters_apply_to_edits(flux_server: str) -> None:
    result = sdk_client(flux_server).images.edit(
        image=("photo.png", PNG, "image/png"),
        prompt="a red fox",
        size="128x96",
        output_format="webp",
        extra_body={
            "acceleration": "high",
            "sync_mode": "true",
            "quality": "low",
            "strength": "0.9",
            "made_up_knob": "1",
        },
    )
    assert result.data is not None and result.data[0].url is not None
    assert result.data[0].url.startswith("data:image/webp;base64,")
    image = decode_b64(result.data[0].url.split(",", 1)[1])
    assert (image.format, image.size) == ("WEBP", SIZE)
    extra = result.model_extra or {}
    assert extra["acceleration"] == "high"
    assert extra["ignored_parameters"] == ["made_up_knob"]
    assert result.quality == "low"


@pytest.mark.parametrize("server", ["flux_server", "kontext_server"])
def test_acceleration_cache_skips_transformer_work_in_edits(
    server: str, request: pytest.FixtureRequest
) -> None:
    """The edit pipelines open no cache context themselves; without the runner's, the
    first-block cache would fail the job (or, skipping nothing, change nothing)."""
    url = request.getfixturevalue(server)

    def output(acceleration: str) -> np.ndarray:
        steps = {"num_inference_steps": 16, "strength": 1, "acceleration": acceleration}
        return only_image(edit(url, extra_body=steps))

    assert not np.array_equal(output("none"), output("high"))


class FlagAll:
    """A scripted safety checker that flags every image it sees."""

    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        return [True] * len(images)


@pytest.mark.parametrize("strength", ["0", "0.8"])
def test_safety_checker_runs_on_edits_even_when_the_input_comes_back_unchanged(
    flux_runner: FluxRunner, tmp_path_factory: pytest.TempPathFactory, strength: str
) -> None:
    for url in serve(flux_runner.with_safety_checker(FlagAll()), tmp_path_factory):
        with pytest.raises(openai.BadRequestError) as raised:
            edit(url, extra_body={"strength": strength})
        assert raised.value.code == "content_policy_violation"
        unchecked = edit(url, extra_body={"strength": strength, "disable_safety_checker": "true"})
        assert unchecked.data is not None and len(unchecked.data) == 1
