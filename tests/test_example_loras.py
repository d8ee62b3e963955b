"""The example LoRAs in examples/loras (`pipeline.embedded.train_loras`) against a real
server on the embedded model: listed, each changing the picture in its own way, and
nothing at scale 0; and the styles and the training script they come from."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embedded import TINY_SHAPE, build_embedded_pipeline, scenes
from pipeline.embedded.train_loras import LORA_STAGE, targets, train_lora
from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from pipeline.loras import LoraSpec
from stream.app import create_app
from tests.conftest import make_settings
from tests.servers import live_server

EXAMPLES = Path(__file__).parent.parent / "examples" / "loras"
PROMPT = "a large red square in the center on a white background"
# Pastel is judged on a dark, saturated picture: on a white one there is little to lighten.
DARK_PROMPT = "a large red square in the center on a blue background"
SEEDS = (1, 2, 3, 4)
SIZE = "256x256"


@pytest.fixture(scope="module")
def server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    runner = create_flux_runner(ModelSpec(cache_dir=model_cache, loras=LoraSpec(cache=4)))
    settings = make_settings(tmp_path_factory.mktemp("examples"), lora_dir=EXAMPLES)
    with live_server(create_app(settings, ThreadedEngine(runner, max_queued=8))) as url:
        yield url


def generate(
    url: str, seed: int, loras: list[dict[str, Any]] | None = None, prompt: str = PROMPT
) -> bytes:
    body: dict[str, Any] = {"prompt": prompt, "size": SIZE, "response_format": "b64_json"}
    body["seed"] = seed
    if loras is not None:
        body["loras"] = loras
    answer = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["data"][0]["b64_json"])


def rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32) / 255


def red_share(image: np.ndarray) -> float:
    """The share of pixels in the square's red: a filled square covers far more than its
    outline does."""
    red = np.asarray(scenes.COLOURS["red"], np.float32)
    return float((np.abs(image - red).max(axis=-1) < 0.25).mean())


def saturation(image: np.ndarray) -> float:
    return float((image.max(axis=-1) - image.min(axis=-1)).mean())


def pictures(
    url: str, name: str | None, scale: float = 1.0, prompt: str = PROMPT
) -> list[np.ndarray]:
    loras = None if name is None else [{"path": name, "scale": scale}]
    return [rgb(generate(url, seed, loras, prompt)) for seed in SEEDS]


def test_the_server_lists_both_examples(server: str) -> None:
    listed = httpx.get(f"{server}/v1/loras").json()["data"]
    assert {item["id"]: (item["rank"], item["valid"]) for item in listed} == {
        "outline.safetensors": (4, True),
        "pastel.safetensors": (4, True),
    }
    assert all(item["size_bytes"] < 1_000_000 for item in listed)


def test_outline_leaves_much_less_of_the_picture_in_the_object_s_colour(server: str) -> None:
    base = [red_share(image) for image in pictures(server, None)]
    outlined = [red_share(image) for image in pictures(server, "outline.safetensors")]
    # A large square covers 14 % of the picture; the model's squares are blobs of 10-19 %.
    assert min(base) > 0.08, "the base model draws the red square"
    assert all(line < filled for filled, line in zip(base, outlined, strict=True))
    assert np.mean(outlined) < 0.6 * np.mean(base)


def test_pastel_makes_the_picture_lighter_and_less_saturated(server: str) -> None:
    base = pictures(server, None, prompt=DARK_PROMPT)
    pastel = pictures(server, "pastel.safetensors", prompt=DARK_PROMPT)
    for plain, soft in zip(base, pastel, strict=True):
        # Pastel mixes every colour half with white: at least 40 % of that lightening.
        assert soft.mean() > plain.mean() + 0.4 * scenes.PASTEL_WHITE * (1 - plain.mean())
        assert saturation(soft) < 0.85 * saturation(plain)


@pytest.mark.parametrize("name", ["outline.safetensors", "pastel.safetensors"])
def test_scale_zero_gives_the_base_image_byte_for_byte(server: str, name: str) -> None:
    assert generate(server, 5, [{"path": name, "scale": 0}]) == generate(server, 5)


def test_the_styles_draw_outlines_and_pastels_of_the_same_scene() -> None:
    scene = scenes.Scene("white", (scenes.SceneObject("square", "red", "large", "center"),))
    plain, outline, pastel = (scenes.render(scene, 128, 128, style=s) for s in scenes.STYLES)
    assert 0.02 < red_share(outline) < 0.6 * red_share(plain)
    assert np.allclose(pastel, 0.5 * plain + 0.5)
    with pytest.raises(ValueError, match="unknown style"):
        scenes.render(scene, 64, 64, style="sepia")


def test_train_loras_writes_a_rank_4_peft_lora_and_leaves_the_model_as_it_was() -> None:
    pipe = build_embedded_pipeline(TINY_SHAPE)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    stage = replace(LORA_STAGE, buckets=((64, 64, 2, 1.0),))
    tensors = train_lora(pipe, "pastel", 2, stage)
    layers = {f"transformer.{name}" for name in targets(pipe.transformer)}
    assert {key.rsplit(".", 2)[0] for key in tensors} == layers
    for key, value in tensors.items():
        assert value.dtype == torch.float16
        assert value.shape[0 if ".lora_A." in key else 1] == 4
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
