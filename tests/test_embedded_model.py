"""The shipped embedded model draws its scene world: through a real server and the SDK, its
pictures follow their captions, its previews converge on the final image, and seeds and
prompts change what it draws. Its training script runs (on toy settings) so it cannot rot."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from transformers import CLIPTokenizer, T5Tokenizer

from pipeline.embedded import (
    MODEL_DIR,
    TINY_SHAPE,
    TINY_VAE_DIR,
    build_embedded_pipeline,
    embedded_tokenizers,
    scenes,
)
from pipeline.embedded.judge import Rates, Verdict, judge, rates
from pipeline.embedded.train import (
    Checkpoints,
    FlowBatch,
    FlowStage,
    StaleCheckpoint,
    mixed_precision,
    tokenizer_stamp,
)
from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from stream.app import create_app
from tests.conftest import make_settings, sdk_client
from tests.images import decode_b64, pixels, psnr
from tests.servers import live_server

# Captions drawn from the grammar once, with their seeds: a fixed, varied set.
# 100 captions measure a rate to about 4.5 points (24, as the set had, to 9:
# too coarse to tell a model at 75 % from one at 65 %).
FIXED_SCENES = [scenes.random_scene(random.Random(seed), objects=1) for seed in range(100)]


@pytest.fixture(scope="module")
def server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engine = ThreadedEngine(create_flux_runner(ModelSpec(cache_dir=model_cache)), max_queued=8)
    settings = make_settings(tmp_path_factory.mktemp("embedded"))
    with live_server(create_app(settings, engine)) as url:
        yield url


def generate(server: str, prompt: str, seed: int, **extra: object) -> Image.Image:
    result = sdk_client(server).images.generate(
        model="flux.1-dev",
        prompt=prompt,
        response_format="b64_json",
        extra_body={"seed": seed, **extra},
    )
    assert result.data is not None and result.data[0].b64_json is not None
    return decode_b64(result.data[0].b64_json)


def test_the_judge_passes_every_rendered_scene_and_few_noise_images() -> None:
    rng = random.Random(5)
    drawn = [scenes.random_scene(rng, objects=1) for _ in range(60)]
    truth = [
        judge(Image.fromarray((scenes.render(s, 256, 192) * 255).astype(np.uint8)), s)
        for s in drawn
    ]
    assert all(v.background and v.colour and v.position and v.shape is not False for v in truth)
    noise = np.random.default_rng(0).integers(0, 256, (len(drawn), 256, 256, 3), dtype=np.uint8)
    guessed = rates(judge(Image.fromarray(n), s) for n, s in zip(noise, drawn, strict=True))
    assert guessed.background < 0.2 and guessed.colour < 0.4


@pytest.mark.parametrize("background", ["blue", "sunset"])
def test_an_object_wider_than_half_the_picture_is_judged_by_its_own_pixels(
    background: str,
) -> None:
    # Generated objects are often drawn larger than asked; in the rows where one covers
    # most of the width, the row's median is the object's colour, not the background's.
    wide = scenes.SceneObject("square", "red", "large", "center", scale=1.6)
    drawn = scenes.Scene(background, (wide,))
    picture = Image.fromarray((scenes.render(drawn, 256, 256) * 255).astype(np.uint8))
    assert judge(picture, drawn) == Verdict(True, True, True, True, True)


def test_side_asks_only_the_left_or_right_half_position_every_half_named() -> None:
    item = scenes.SceneObject("square", "red", "large", "top right")
    drawn = scenes.Scene("blue", (item,))
    picture = Image.fromarray((scenes.render(drawn, 256, 256) * 255).astype(np.uint8))

    def asked(position: str) -> tuple[bool, bool]:
        verdict = judge(picture, replace(drawn, objects=(replace(item, position=position),)))
        return verdict.position, verdict.side

    assert asked("top right") == (True, True)
    assert asked("bottom right") == (False, True)
    assert asked("right") == (True, True)
    assert asked("top left") == (False, False)
    assert asked("top") == (True, True)


def test_a_request_without_a_size_gets_the_size_the_model_draws_best(server: str) -> None:
    result = sdk_client(server).images.generate(model="flux.1-dev", prompt="a red circle")
    assert result.size == "256x256"


def judged(server: str) -> Rates:
    return rates(
        judge(generate(server, scenes.caption(scene), seed), scene)
        for seed, scene in enumerate(FIXED_SCENES)
    )


def test_pictures_follow_their_captions_to_the_issue_bar(server: str) -> None:
    """The issue's bar, at the default size and steps, on a fixed set of captions: the
    background, the object's colour and its rough position (the left or right half); and,
    stricter, every half the caption names (a corner's row too). Chance is 1 in 12, 1 in
    9, about 1 in 2 and 1 in 4; the shipped model scores 100 %, 95 %, 93 % and 93 % on this
    set; `bench.prompt_following` measures more captions."""
    measured = judged(server)
    assert measured.background >= 0.9, measured
    assert measured.colour >= 0.7, measured
    assert measured.side >= 0.7, measured
    assert measured.position >= 0.7, measured


def test_seeds_change_the_layout_and_captions_change_the_picture(server: str) -> None:
    prompt = "a large red circle on a blue background"
    first, second = generate(server, prompt, 1), generate(server, prompt, 2)
    assert np.abs(pixels(first) - pixels(second)).mean() > 4
    other = generate(server, "a small yellow star in the top right at night", 1)
    assert np.abs(pixels(first) - pixels(other)).mean() > 30


def preview_quality(server: str, preview: str) -> list[float]:
    """PSNR against the final image of each of three previews over 24 steps."""
    events = list(
        sdk_client(server).images.generate(
            model="flux.1-dev",
            prompt="a large orange square on the left on a black background",
            stream=True,
            partial_images=3,
            extra_body={"seed": 3, "num_inference_steps": 24, "preview": preview},
        )
    )
    final = decode_b64(events[-1].b64_json)
    return [psnr(decode_b64(e.b64_json).resize(final.size), final) for e in events[:-1]]


def test_vae_previews_converge_on_the_final_image(server: str) -> None:
    quality = preview_quality(server, "vae")
    assert all(a < b for a, b in pairwise(quality)) and quality[-1] >= 25, quality


def test_tiny_previews_converge_on_the_final_image(server: str) -> None:
    quality = preview_quality(server, "tiny")
    assert all(a < b for a, b in pairwise(quality)) and quality[0] >= 20, quality


def test_linear_previews_do_not_drift_from_the_final_image(server: str) -> None:
    quality = preview_quality(server, "linear")
    assert quality[-1] >= quality[0] >= 15, quality


@pytest.mark.parametrize(
    ("preview", "last_at_least"),
    [("tiny", 25), ("linear", 20)],
)
def test_previews_converge_to_the_issue_bar(
    server: str, preview: str, last_at_least: float
) -> None:
    quality = preview_quality(server, preview)
    assert quality[-1] >= last_at_least, quality
    if preview == "linear":
        assert quality[-1] >= quality[0], quality
    else:
        assert all(a < b for a, b in pairwise(quality)), quality


def test_the_shipped_model_is_small_enough_to_commit() -> None:
    files = [f for folder in (MODEL_DIR, TINY_VAE_DIR) for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20


def test_the_training_script_trains_a_toy_that_loads_and_resumes(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pipeline.embedded.train", "--tiny", "--threads", "1"]
    command += ["--bf16", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "flow 0/" in first.stdout and "wrote" in first.stdout
    pipe = FluxPipeline.from_pretrained(tmp_path / "out" / "model", local_files_only=True)
    image = pipe("a red circle", width=64, height=64, num_inference_steps=2, max_sequence_length=32)
    assert image.images[0].size == (64, 64)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "flow 0/" not in again.stdout, "a finished phase is not trained again"


def test_a_bf16_run_computes_with_the_weights_of_each_step() -> None:
    """An autocast cache kept for the whole run once trained stale bfloat16 copies."""
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    with mixed_precision(True):
        first = layer(torch.ones(1, 4))
        first.sum().backward()
        opt.step()
        assert not torch.equal(layer(torch.ones(1, 4)), first)


def test_the_tokenizers_are_the_same_in_every_process() -> None:
    """A resumed training run builds them again: their ids must be the ones its text
    encoders were trained on (hash-ordered ties once changed CLIP's ids between runs)."""
    fingerprint = (
        "from pipeline.embedded import embedded_tokenizers; "
        "from pipeline.embedded.train import tokenizer_stamp; "
        "print(tokenizer_stamp(*embedded_tokenizers()))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", fingerprint],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    ]
    assert runs[0] == runs[1]


def test_the_shipped_model_reads_the_token_ids_the_tokenizers_are_built_with() -> None:
    """Its text encoders and transformer learned with these ids; a rebuild (training it
    again, resuming a run) must give the same ones."""
    shipped = (
        CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer"),
        T5Tokenizer.from_pretrained(MODEL_DIR / "tokenizer_2"),
    )
    assert tokenizer_stamp(*shipped) == tokenizer_stamp(*embedded_tokenizers())


def test_a_checkpoint_made_with_other_token_ids_is_refused(tmp_path: Path) -> None:
    made = Checkpoints(tmp_path, stamp="one")
    made.save("text", 3, {"weights": torch.zeros(1)})
    assert made.load("text") is not None
    with pytest.raises(StaleCheckpoint, match="new --work folder"):
        Checkpoints(tmp_path, stamp="another").load("text")


def test_distillation_also_learns_where_a_sampler_asks_first() -> None:
    """A sampler's first step asks the transformer at pure noise, where guidance sets the
    colours and the layout; the logit-normal draw of noise levels almost never goes there."""
    pipe = build_embedded_pipeline(TINY_SHAPE)

    def noise_levels(on_grid: float) -> torch.Tensor:
        stage = FlowStage(1, 1e-4, ((64, 64, 64, 1.0),), on_grid=on_grid)
        return FlowBatch(pipe, random.Random(0), 64, 64, 64, step=0, stage=stage).sigma

    assert (noise_levels(0.0) > 0.99).sum() == 0
    gridded = noise_levels(1.0)
    assert (gridded == 1).sum() >= 2 and bool((gridded > 0).all())
