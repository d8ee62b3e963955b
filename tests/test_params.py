"""Normalization of request fields into a Job, as the reference's table says (no server)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest

from pipeline.jobs import ModelProfile
from stream.errors import InvalidRequest
from stream.params import ImagePlan, parse_generation_request, plan_generation
from stream.settings import Settings
from tests.conftest import make_settings
from tests.fakes import PROFILE


def plan(
    body: Mapping[str, object], settings: Settings, profile: ModelProfile = PROFILE
) -> ImagePlan:
    return plan_generation(parse_generation_request(body), settings, profile)


def test_multipart_strings_are_coerced_like_json_values(settings: Settings) -> None:
    form = {
        "prompt": "x",
        "n": "3",
        "seed": "5",
        "size": "64x48",
        "num_inference_steps": "6",
        "cfg_scale": "0.8",
        "stream": "false",
        "sync_mode": "true",
        "go_fast": "1",
        "strength": "0.5",
        "output_quality": "70",
        "max_sequence_length": "128",
    }
    result = plan(form, settings)
    job = result.job
    assert job.seeds == (5, 6, 7)
    assert (job.num_inference_steps, job.guidance_scale) == (6, 0.8)
    assert result.size == (64, 48) and result.sync_mode and job.go_fast
    assert result.quality == 70
    assert job.pipeline_kwargs == {"max_sequence_length": 128}


@pytest.mark.parametrize("field", ["megapixels", "resolution"])
def test_megapixel_tiers_sent_as_json_numbers_mean_the_same_as_strings(
    settings: Settings, field: str
) -> None:
    for number, text in [(1, "1"), (0.25, "0.25")]:
        assert plan({"prompt": "x", field: number}, settings).size == (
            plan({"prompt": "x", field: text}, settings).size
        )
    with pytest.raises(InvalidRequest) as raised:
        plan({"prompt": "x", field: True}, settings)
    assert raised.value.param == field


def test_null_fields_and_null_extras_mean_default(settings: Settings) -> None:
    body = {name: None for name in ("n", "quality", "acceleration", "go_fast", "strength")}
    result = plan({"prompt": "x", **body, "negative_prompt": None}, settings)
    assert result.job.num_images == 1 and result.job.acceleration == "none"
    assert result.job.pipeline_kwargs == {} and result.ignored_parameters == ()


@pytest.mark.parametrize(
    ("quality", "steps", "echoed"),
    [
        ("low", 14, "low"),
        ("medium", 21, "medium"),
        ("standard", 21, "medium"),
        ("high", 28, "high"),
        ("hd", 28, "high"),
        ("xhigh", 28, "high"),
        ("max", 28, "high"),
        ("auto", 28, "high"),
        (None, 28, "high"),
    ],
)
def test_quality_is_a_step_preset_of_the_model_default(
    settings: Settings, quality: str | None, steps: int, echoed: str
) -> None:
    dev = dataclasses.replace(PROFILE, default_steps=28)
    result = plan({"prompt": "x", "quality": quality}, settings, dev)
    assert (result.job.num_inference_steps, result.quality_name) == (steps, echoed)


def test_explicit_steps_win_over_quality(settings: Settings) -> None:
    assert (
        plan(
            {"prompt": "x", "quality": "low", "num_inference_steps": 9}, settings
        ).job.num_inference_steps
        == 9
    )


def test_cfg_scale_wins_over_guidance_scale_and_defaults_come_from_the_profile(
    settings: Settings,
) -> None:
    assert (
        plan({"prompt": "x", "cfg_scale": 2, "guidance_scale": 7}, settings).job.guidance_scale == 2
    )
    assert plan({"prompt": "x", "guidance_scale": 7}, settings).job.guidance_scale == 7
    schnell = dataclasses.replace(PROFILE, default_steps=4, default_guidance=0.0)
    job = plan({"prompt": "x"}, settings, schnell).job
    assert (job.num_inference_steps, job.guidance_scale) == (4, 0.0)


def test_output_quality_wins_over_output_compression(settings: Settings) -> None:
    assert (
        plan({"prompt": "x", "output_quality": 40, "output_compression": 90}, settings).quality
        == 40
    )
    assert plan({"prompt": "x", "output_compression": 90}, settings).quality == 90


def test_openai_fields_and_strength_are_accepted_without_changing_the_job(
    settings: Settings,
) -> None:
    base = plan({"prompt": "x", "seed": 1}, settings).job
    extras = {
        "strength": 0.3,
        "background": "transparent",
        "style": "vivid",
        "user": "u-1",
        "moderation": "low",
    }
    accepted = plan({"prompt": "x", "seed": 1, **extras}, settings)
    assert accepted.job == base and accepted.ignored_parameters == ()


def test_scalar_pipeline_keywords_pass_through_and_the_rest_is_reported(
    settings: Settings,
) -> None:
    body = {
        "prompt": "x",
        "negative_prompt": "blur",
        "true_cfg_scale": "4",
        "latents": 3,
        "output_type": "latent",
        "callback_on_step_end": "x",
        "prompt_embeds": 1,
        "max_sequence_length": [1, 2],
        "controlnets": "canny.safetensors",
    }
    result = plan(body, settings)
    assert result.job.pipeline_kwargs == {"negative_prompt": "blur", "true_cfg_scale": 4.0}
    assert result.ignored_parameters == (
        "callback_on_step_end",
        "controlnets",
        "latents",
        "max_sequence_length",
        "output_type",
        "prompt_embeds",
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": "many"}, "n"),
        ({"seed": -1}, "seed"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"cfg_scale": 101}, "cfg_scale"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"strength": 1.5}, "strength"),
        ({"output_format": "bmp"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"output_quality": -1}, "output_quality"),
        ({"response_format": "file"}, "response_format"),
        ({"acceleration": "ludicrous"}, "acceleration"),
        ({"go_fast": "maybe"}, "go_fast"),
        ({"sync_mode": "perhaps"}, "sync_mode"),
        ({"quality": "ultra"}, "quality"),
        ({"background": "green"}, "background"),
        ({"style": "bold"}, "style"),
        ({"moderation": "strict"}, "moderation"),
        ({"size": "huge"}, "size"),
        ({"aspect_ratio": "tall"}, "aspect_ratio"),
        ({"resolution": "8X"}, "resolution"),
        ({"megapixels": "lots"}, "megapixels"),
        ({"max_sequence_length": 4096}, "max_sequence_length"),
        ({"true_cfg_scale": "strong"}, "true_cfg_scale"),
        ({"prompt": "   "}, "prompt"),
        ({"enable_safety_checker": True}, "enable_safety_checker"),
        ({"n": True}, "n"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"seed": False}, "seed"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"partial_images": True}, "partial_images"),
    ],
)
def test_each_bad_value_is_a_400_naming_its_param(
    settings: Settings, body: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        plan({"prompt": "x", **body}, settings)
    assert raised.value.param == param


SAFE = dataclasses.replace(PROFILE, safety_checker=True)


@pytest.mark.parametrize(
    ("overrides", "body", "checked"),
    [
        ({}, {}, True),
        ({"safety_checker_default": False}, {}, False),
        ({"safety_checker_default": False}, {"enable_safety_checker": True}, True),
        ({}, {"enable_safety_checker": False}, False),
        ({}, {"disable_safety_checker": True}, False),
        ({}, {"disable_safety_checker": "false"}, True),
    ],
)
def test_safety_checker_follows_server_default_then_the_request(
    tmp_path: Path, overrides: dict[str, object], body: dict[str, object], checked: bool
) -> None:
    result = plan({"prompt": "x", **body}, make_settings(tmp_path, **overrides), SAFE)
    assert result.job.safety_check is checked


def test_a_request_may_not_turn_the_checker_off_when_the_server_forbids_it(
    tmp_path: Path,
) -> None:
    strict = make_settings(tmp_path, safety_checker_optional=False)
    with pytest.raises(InvalidRequest) as raised:
        plan({"prompt": "x", "disable_safety_checker": True}, strict, SAFE)
    assert raised.value.param == "disable_safety_checker"


def test_without_a_checker_images_are_not_checked(settings: Settings) -> None:
    assert not plan({"prompt": "x", "disable_safety_checker": True}, settings).job.safety_check
    assert not plan({"prompt": "x"}, settings).job.safety_check
