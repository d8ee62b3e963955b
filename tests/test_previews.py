"""Preview decoders and x0 previews on the real embedded pipeline (through the runner)."""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
from itertools import pairwise
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from pipeline import preview_cache
from pipeline.embedded import MODEL_DIR, scenes
from pipeline.factory import create_flux_runner
from pipeline.jobs import Event, Job, Preview, Result
from pipeline.loading import ModelSpec
from pipeline.previews import (
    AutoencoderPreviewDecoder,
    LinearPreviewDecoder,
    StepObservation,
    fit_linear_decoder,
    observe_scheduler_steps,
    preview_steps,
    sample_latents,
)
from pipeline.runner import FluxRunner
from tests.images import psnr


@pytest.mark.parametrize(
    ("total", "k", "expected"),
    [
        (8, 3, (2, 4, 6)),
        (28, 3, (7, 14, 21)),
        (8, 1, (4,)),
        (4, 3, (1, 2, 3)),
        (3, 3, (1, 2)),
        (1, 3, ()),
        (28, 0, ()),
    ],
)
def test_previews_are_evenly_spread_distinct_and_never_on_the_last_step(
    total: int, k: int, expected: tuple[int, ...]
) -> None:
    steps = preview_steps(total, k)
    assert steps == expected
    assert len(set(steps)) == len(steps)
    assert all(1 <= step < total for step in steps)


@pytest.fixture(scope="module")
def runner(model_cache: Path) -> FluxRunner:
    return create_flux_runner(ModelSpec(cache_dir=model_cache))


def run(runner: FluxRunner, **fields: object) -> tuple[list[Preview], Result]:
    """Run one job through the real runner; return its previews and its result."""
    defaults: dict[str, object] = {
        "prompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
        "seeds": (7,),
        "num_inference_steps": 8,
        "guidance_scale": 3.5,
        "preview_size": (64, 64),
    }
    events: list[Event] = []
    result = runner.run(Job(**{**defaults, **fields}), events.append, lambda: False)  # type: ignore[arg-type]
    return [event for event in events if isinstance(event, Preview)], result


@pytest.mark.parametrize(
    ("steps", "k", "expected"),
    [(8, 3, [2, 4, 6]), (10, 1, [5]), (5, 4, [1, 2, 3, 4]), (4, 9, [1, 2, 3]), (6, 0, [])],
)
def test_runner_emits_previews_on_the_expected_steps(
    runner: FluxRunner, steps: int, k: int, expected: list[int]
) -> None:
    previews, _ = run(runner, num_inference_steps=steps, partial_images=k)
    assert [preview.step for preview in previews] == expected
    assert [preview.index for preview in previews] == list(range(len(expected)))
    assert {preview.total_steps for preview in previews} <= {steps}


def test_fitted_linear_map_beats_a_zero_or_mean_image_on_held_out_latents(
    runner: FluxRunner,
) -> None:
    """The mean image is the held-out decodes' mean colour: the best constant guess."""
    vae = runner.pipe.vae
    held_out = sample_latents(vae, 4, 128, torch.Generator().manual_seed(99))
    full = AutoencoderPreviewDecoder(vae, runner.pipe.vae_scale_factor)
    references = np.stack([np.asarray(full.decode(z, (128, 128))) for z in held_out])
    linear = fit_linear_decoder(vae)
    previews = np.stack([np.asarray(linear.decode(z, (128, 128))) for z in held_out])
    mean_image = np.broadcast_to(references.mean(axis=(0, 1, 2)), references.shape)
    fitted = psnr(previews, references)
    assert fitted > psnr(np.zeros_like(references), references) + 6
    assert fitted > psnr(mean_image, references)


def test_x0_previews_get_closer_to_the_final_image_step_by_step(runner: FluxRunner) -> None:
    """PSNR of each preview against the final image rises at every step.

    The previews use the `vae` decoder at full size, so the only difference between a
    preview and the final image is the x0 estimate, and the last one (a step before the
    end) is already close to it.
    """
    previews, result = run(
        runner,
        width=128,
        height=128,
        num_inference_steps=10,
        partial_images=9,
        preview_size=(128, 128),
        preview_decoder="vae",
    )
    curve = [psnr(preview.image, result.images[0]) for preview in previews]
    assert len(curve) == 9
    assert all(later > earlier for earlier, later in pairwise(curve))
    assert curve[-1] > 25, curve


def no_refit(*args: object, **kwargs: object) -> None:
    raise AssertionError("no map should have been fitted")


def test_the_embedded_model_previews_with_the_map_it_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preview_cache, "fit_linear_decoder", no_refit)
    runner = create_flux_runner(ModelSpec(cache_dir=tmp_path))
    shipped = json.loads((MODEL_DIR / preview_cache.SHIPPED_MAP).read_text())
    linear = runner.decoders["linear"]
    assert torch.allclose(linear.weight, torch.tensor(shipped["weight"]))  # type: ignore[attr-defined]
    assert not (tmp_path / "previews").exists(), "nothing fitted, nothing cached"


def test_a_hub_id_in_the_local_cache_previews_with_the_map_its_snapshot_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hugging Face cache's layout (models--owner--name/snapshots/<commit>, refs/main):
    the hub id loads offline, and its VAE's folder is the snapshot's."""
    repo = tmp_path / "hub" / "models--someone--scene-flux"
    shutil.copytree(MODEL_DIR, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(preview_cache, "fit_linear_decoder", no_refit)
    runner = create_flux_runner(ModelSpec(model="someone/scene-flux", cache_dir=tmp_path))
    shipped = json.loads((MODEL_DIR / preview_cache.SHIPPED_MAP).read_text())
    assert torch.allclose(runner.decoders["linear"].weight, torch.tensor(shipped["weight"]))  # type: ignore[attr-defined]


@torch.no_grad()
def test_the_shipped_map_previews_the_scene_world_better_than_a_fitted_one(
    runner: FluxRunner,
) -> None:
    """It was trained with the VAE on the pictures the model draws; the fit sees only
    synthetic colour fields."""
    vae = runner.pipe.vae
    rng = random.Random(3)
    drawn = np.stack([scenes.render(scenes.random_scene(rng), 128, 128) for _ in range(8)])
    pictures = torch.from_numpy(drawn).permute(0, 3, 1, 2) * 2 - 1
    latents = (vae.encode(pictures).latent_dist.mean - vae.config.shift_factor) * (
        vae.config.scaling_factor
    )
    full = AutoencoderPreviewDecoder(vae, runner.pipe.vae_scale_factor)
    references = np.stack([np.asarray(full.decode(z, (128, 128))) for z in latents])

    def fidelity(decoder: LinearPreviewDecoder) -> float:
        return psnr(
            np.stack([np.asarray(decoder.decode(z, (128, 128))) for z in latents]), references
        )

    shipped = runner.decoders["linear"]
    assert isinstance(shipped, LinearPreviewDecoder)
    assert fidelity(shipped) > fidelity(fit_linear_decoder(vae)) + 1


def test_an_unreadable_shipped_map_is_replaced_by_a_fit(
    runner: FluxRunner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "model"
    (folder / preview_cache.SHIPPED_MAP).parent.mkdir(parents=True)
    (folder / preview_cache.SHIPPED_MAP).write_text('{"weight": [[1, 2]], "bias": [0]}')
    vae = copy.deepcopy(runner.pipe.vae)
    vae.register_to_config(_name_or_path=str(folder / preview_cache.SHIPPED_MAP.parent))
    with caplog.at_level(logging.WARNING, logger=preview_cache.__name__):
        decoder = preview_cache.linear_decoder(vae, tmp_path / "cache")
    assert decoder.weight.shape == (3, 16)
    assert "unreadable vae/latent_rgb.json" in caplog.text
    assert list((tmp_path / "cache" / "previews").glob("linear-*.json"))


@pytest.fixture
def model_without_a_map(tmp_path: Path) -> str:
    """The embedded model's folder less its shipped preview map: a model to fit one for."""
    folder = tmp_path / "unmapped"
    shutil.copytree(MODEL_DIR, folder)
    (folder / preview_cache.SHIPPED_MAP).unlink()
    return str(folder)


def test_linear_fit_is_cached_on_disk_and_reused_on_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_without_a_map: str
) -> None:
    spec = ModelSpec(model=model_without_a_map, cache_dir=tmp_path)
    first = create_flux_runner(spec)
    (cached,) = (tmp_path / "previews").glob("linear-*.json")
    assert len(json.loads(cached.read_text())["weight"]) == 3

    monkeypatch.setattr(preview_cache, "fit_linear_decoder", no_refit)
    second = create_flux_runner(spec)
    assert torch.equal(second.decoders["linear"].weight, first.decoders["linear"].weight)  # type: ignore[attr-defined]
    assert torch.equal(second.decoders["linear"].bias, first.decoders["linear"].bias)  # type: ignore[attr-defined]


def test_a_cache_dir_that_cannot_be_written_still_gives_the_fitted_map(
    runner: FluxRunner, tmp_path: Path
) -> None:
    # A read-only deployment with a model folder mounted: the fit is redone at each start.
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    decoder = preview_cache.cached_linear_decoder(runner.pipe.vae, blocked / "cache")
    fitted = preview_cache.cached_linear_decoder(runner.pipe.vae, tmp_path)
    assert torch.allclose(decoder.weight, fitted.weight, atol=1e-4)


def test_a_changed_vae_gets_its_own_fit(runner: FluxRunner, tmp_path: Path) -> None:
    vae = runner.pipe.vae
    preview_cache.cached_linear_decoder(vae, tmp_path)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    try:
        preview_cache.cached_linear_decoder(vae, tmp_path)
    finally:
        with torch.no_grad():
            vae.decoder.conv_out.bias.sub_(0.1)
    assert len(list((tmp_path / "previews").glob("linear-*.json"))) == 2


def test_tiny_vae_from_a_local_folder_becomes_the_tiny_preview(
    model_cache: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    AutoencoderTiny(
        latent_channels=16,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(tmp_path / "taef1")
    runner = create_flux_runner(ModelSpec(cache_dir=model_cache, tiny_vae=tmp_path / "taef1"))
    assert runner.profile.preview_decoders == ("linear", "vae", "tiny")
    previews, _ = run(
        runner,
        width=128,
        height=64,
        partial_images=2,
        preview_size=(64, 32),
        preview_decoder="tiny",
    )
    assert [preview.image.size for preview in previews] == [(64, 32), (64, 32)]


class HostReadForbidden(torch.Tensor):
    """A tensor that fails the test when read on the host, as a GPU tensor would sync."""

    def __float__(self) -> float:
        raise AssertionError("the observer read a device tensor on the host")

    def item(self) -> float:
        raise AssertionError("the observer read a device tensor on the host")


class SteppingScheduler:
    """The part of a diffusers scheduler that the observer touches."""

    def __init__(self) -> None:
        self.sigmas = torch.tensor([1.0, 0.5, 0.0]).as_subclass(HostReadForbidden)
        self.step_index = 0

    def step(self, model_output: torch.Tensor, timestep: object, sample: torch.Tensor) -> None:
        self.step_index += 1


def test_the_step_observer_never_reads_sigma_on_the_host() -> None:
    scheduler = SteppingScheduler()
    seen: list[StepObservation] = []
    sample, velocity = torch.ones(1, 4, 8), torch.full((1, 4, 8), 2.0)
    with observe_scheduler_steps(scheduler, seen.append):
        scheduler.step(velocity, 0, sample)
        scheduler.step(velocity, 1, sample)
    clean = seen[-1].predicted_clean().as_subclass(torch.Tensor)
    assert torch.equal(clean, torch.zeros(1, 4, 8))
