"""What the pipeline must do with the parameters: the SDK against the real embedded model."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from pipeline.engine import Runner, ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.jobs import Job, JobRejected
from pipeline.loading import ModelSpec
from pipeline.runner import FluxRunner
from pipeline.safety import ClassifierSafetyChecker, SafetyCheckerLoadError, SafetySpec
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.servers import live_server

SMALL = {"size": "64x64", "response_format": "b64_json"}


@pytest.fixture(scope="module")
def runner(model_cache: Path) -> FluxRunner:
    return create_flux_runner(ModelSpec(cache_dir=model_cache))


@contextlib.contextmanager
def serving(runner: Runner, tmp_path: Path, **settings: object) -> Iterator[str]:
    engine = ThreadedEngine(runner, max_queued=4)
    with live_server(create_app(make_settings(tmp_path, **settings), engine)) as url:
        yield url


@pytest.fixture(scope="module")
def server(runner: FluxRunner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(runner, tmp_path_factory.mktemp("params")) as url:
        yield url


def generate(base_url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{base_url}/v1/images/generations", json={"prompt": "a fox", **SMALL, **body}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.int16)


def test_same_seed_and_parameters_give_byte_identical_images(server: str) -> None:
    first, second = generate(server, seed=42), generate(server, seed=42)
    assert first["data"][0]["b64_json"] == second["data"][0]["b64_json"]


def test_n3_gives_three_distinct_seeds_each_reproducible_alone(server: str) -> None:
    batch = generate(server, n=3, seed=100)["data"]
    assert [item["seed"] for item in batch] == [100, 101, 102]
    images = [pixels(item["b64_json"]) for item in batch]
    assert len({image.tobytes() for image in images}) == 3
    for item, image in zip(batch, images, strict=True):
        alone = pixels(generate(server, seed=item["seed"])["data"][0]["b64_json"])
        # A batch of 3 and a batch of 1 may differ by float rounding in batched CPU kernels,
        # never by more than a couple of levels; a different seed differs by far more.
        assert np.abs(alone - image).max() <= 2
        assert np.abs(alone - images[0 if item is not batch[0] else 1]).mean() > 10


@pytest.mark.parametrize("level", ["regular", "high"])
def test_acceleration_runs_a_cache_and_says_so(server: str, level: str) -> None:
    body = {"seed": 3, "num_inference_steps": 28}
    plain = generate(server, **body)
    fast = generate(server, acceleration=level, **body)
    assert fast["acceleration"] == level
    assert fast["speedup"].startswith("first-block cache")
    difference = np.abs(pixels(fast["data"][0]["b64_json"]) - pixels(plain["data"][0]["b64_json"]))
    assert 0 < difference.mean() < 20, "cached steps change the image a little, not entirely"


def test_go_fast_falls_back_to_the_high_cache_and_the_response_says_so(server: str) -> None:
    response = generate(server, go_fast=True)
    assert response["acceleration"] == "high"
    assert "go_fast" in response["speedup"] and "acceleration=high" in response["speedup"]


def test_pipeline_keywords_reach_the_pipeline(server: str) -> None:
    plain = generate(server, seed=5)
    negative = generate(server, seed=5, negative_prompt="a dog", true_cfg_scale="4")
    assert negative["ignored_parameters"] == []
    assert plain["data"][0]["b64_json"] != negative["data"][0]["b64_json"]
    short = generate(server, seed=5, max_sequence_length=8, raw=0.5, upscale="2x")
    assert short["ignored_parameters"] == ["raw", "upscale"]


def test_out_of_range_pipeline_keyword_is_a_400_naming_it(server: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_client(server).images.generate(prompt="x", extra_body={"max_sequence_length": 513})
    assert raised.value.param == "max_sequence_length"


def tiny_classifier(folder: Path, flagged_bias: float) -> Path:
    """A 1-layer ViT whose logits are only its bias: it says `nsfw` when the bias says so."""
    config = ViTConfig(
        image_size=32,
        patch_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, flagged_bias]))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_classifier_checker_loads_a_local_model_and_flags_by_label(tmp_path: Path) -> None:
    always = ClassifierSafetyChecker(SafetySpec(tiny_classifier(tmp_path / "a", 10.0)))
    never = ClassifierSafetyChecker(SafetySpec(tiny_classifier(tmp_path / "n", -10.0)))
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (64, 64), "blue")]
    assert always.flagged(images) == [True, True]
    assert never.flagged(images) == [False, False]
    with pytest.raises(SafetyCheckerLoadError, match="include none of"):
        ClassifierSafetyChecker(SafetySpec(tmp_path / "a", labels=("gore",)))
    with pytest.raises(SafetyCheckerLoadError, match="image-classification model folder"):
        ClassifierSafetyChecker(SafetySpec(tmp_path / "missing"))


def test_all_flagged_is_a_content_policy_error_and_the_check_can_be_turned_off(
    runner: FluxRunner, tmp_path: Path
) -> None:
    checker = ClassifierSafetyChecker(SafetySpec(tiny_classifier(tmp_path / "m", 10.0)))
    with serving(runner.with_safety_checker(checker), tmp_path) as url:
        client = sdk_client(url)
        with pytest.raises(openai.BadRequestError) as raised:
            client.images.generate(prompt="x", size="64x64")
        assert raised.value.code == "content_policy_violation"
        seen = []
        with pytest.raises(openai.APIError) as streamed:
            for event in client.images.generate(
                prompt="x", size="64x64", stream=True, partial_images=2
            ):
                seen.append(event.type)
        assert seen == [], "previews are checked too"
        assert streamed.value.code == "content_policy_violation"
        unchecked = client.images.generate(
            prompt="x", size="64x64", extra_body={"enable_safety_checker": False}
        )
        assert unchecked.data is not None and len(unchecked.data) == 1


class FlagSecond:
    """A scripted checker: flags the second image of each batch of final images."""

    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        return [index == 1 for index in range(len(images))]


def test_a_flagged_image_is_withheld_and_the_others_are_returned(
    runner: FluxRunner, tmp_path: Path
) -> None:
    with serving(runner.with_safety_checker(FlagSecond()), tmp_path) as url:
        response = generate(url, n=3, seed=7)
        assert [item["seed"] for item in response["data"]] == [7, 9]
        assert response["filtered_images"] == 1
        unchecked = generate(url, n=3, seed=7, disable_safety_checker=True)
        assert [item["seed"] for item in unchecked["data"]] == [7, 8, 9]


def test_a_keyword_value_the_pipeline_refuses_rejects_the_job_instead_of_failing_it(
    runner: FluxRunner,
) -> None:
    job = Job(
        prompt="x",
        width=64,
        height=64,
        seeds=(1,),
        num_inference_steps=2,
        guidance_scale=3.5,
        pipeline_kwargs={"max_sequence_length": 4096},
    )
    with pytest.raises(JobRejected, match="max_sequence_length"):
        runner.run(job, lambda event: None, lambda: False)
