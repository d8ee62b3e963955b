"""LoRA fields and the LoRA folder on the HTTP side (no model): both request forms, the
path rules, the 400s before anything queues, GET /v1/loras, and engine refusals."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import openai
import pytest

from pipeline.jobs import InvalidLora, LoraRef
from stream.app import create_app
from stream.errors import InvalidRequest
from stream.params import ImagePlan, parse_generation_request, plan_generation
from stream.settings import Settings
from tests.conftest import make_settings, sdk_client
from tests.fakes import PROFILE, FakeEngine
from tests.loras import random_pairs, save_peft_lora
from tests.servers import live_server

SHAPES = {"transformer_blocks.0.attn.to_q": (192, 192), "transformer_blocks.0.ff.net.2": (768, 192)}


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    save_peft_lora(root / "outline.safetensors", random_pairs(SHAPES, SHAPES, 4, seed=1))
    save_peft_lora(root / "styles" / "pastel.safetensors", random_pairs(SHAPES, SHAPES, 8, seed=2))
    save_peft_lora(
        root / "folder-lora" / "pytorch_lora_weights.safetensors",
        random_pairs(SHAPES, SHAPES, 2, seed=3),
    )
    return root


@pytest.fixture
def lora_settings(tmp_path: Path, lora_dir: Path) -> Settings:
    return make_settings(tmp_path, lora_dir=lora_dir)


def plan(body: Mapping[str, object], settings: Settings, **profile: object) -> ImagePlan:
    model = dataclasses.replace(PROFILE, **profile)  # type: ignore[arg-type]
    return plan_generation(parse_generation_request(body), settings, model)


def refusal(body: Mapping[str, object], settings: Settings, **profile: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        plan(body, settings, **profile)
    return raised.value


def test_fal_and_replicate_forms_become_the_same_list(lora_settings: Settings) -> None:
    fal = plan(
        {
            "prompt": "x",
            "loras": [
                {"path": "outline.safetensors", "scale": 0.8},
                {"path": "styles/pastel.safetensors"},
            ],
        },
        lora_settings,
    )
    replicate = plan(
        {
            "prompt": "x",
            "lora_weights": "outline.safetensors",
            "lora_scale": 0.8,
            "extra_lora": "styles/pastel.safetensors",
        },
        lora_settings,
    )
    assert fal.job.loras == replicate.job.loras
    outline, pastel = fal.job.loras
    assert (outline.name, outline.scale, pastel.name, pastel.scale) == (
        "outline.safetensors",
        0.8,
        "styles/pastel.safetensors",
        1.0,
    )
    assert Path(outline.file) == (lora_settings.lora_dir / "outline.safetensors").resolve()  # type: ignore[operator]
    assert fal.ignored_parameters == replicate.ignored_parameters == ()


def test_loras_come_first_then_replicate_s_two_fields(lora_settings: Settings) -> None:
    both = plan(
        {
            "prompt": "x",
            "extra_lora": "folder-lora",
            "lora_weights": "styles/pastel.safetensors",
            "loras": [{"path": "outline.safetensors", "scale": -1}],
        },
        lora_settings,
    )
    names = [lora.name for lora in both.job.loras]
    assert names == ["outline.safetensors", "styles/pastel.safetensors", "folder-lora"]
    assert both.job.loras[2].file.endswith("pytorch_lora_weights.safetensors")


def test_multipart_forms_send_loras_as_json_text(lora_settings: Settings) -> None:
    text = json.dumps([{"path": "outline.safetensors", "scale": 0.5}])
    form = plan({"prompt": "x", "loras": text, "lora_scale": "2"}, lora_settings)
    assert [(lora.name, lora.scale) for lora in form.job.loras] == [("outline.safetensors", 0.5)]
    assert form.ignored_parameters == ("lora_scale",)  # a scale without its LoRA
    assert refusal({"prompt": "x", "loras": "[{"}, lora_settings).param == "loras"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("loras", [{"path": "outline.safetensors", "scale": 4.5}], "loras.0.scale"),
        ("loras", [{"path": "outline.safetensors", "weight": 1}], "loras.0.weight"),
        ("loras", [{"scale": 1}], "loras.0.path"),
        ("lora_scale", 3.5, "lora_scale"),
        ("extra_lora_scale", -1.5, "extra_lora_scale"),
    ],
)
def test_scales_outside_their_range_are_a_400_naming_the_field(
    lora_settings: Settings, field: str, value: object, param: str
) -> None:
    body = {"prompt": "x", "lora_weights": "outline.safetensors", "extra_lora": "folder-lora"}
    assert refusal({**body, field: value}, lora_settings).param == param


@pytest.mark.parametrize(
    "body",
    [
        {"loras": [{"path": "outline.safetensors"}]},
        {"lora_weights": "outline.safetensors"},
        {"extra_lora": "outline.safetensors"},
        {"lora_scale": 0.5},
    ],
)
def test_a_server_without_a_lora_folder_refuses_every_lora_field(
    settings: Settings, body: dict[str, object]
) -> None:
    error = refusal({"prompt": "x", **body}, settings)
    assert "this server has no LoRAs" in error.message
    assert error.param == next(iter(body))


def test_loras_are_no_longer_ignored_parameters(settings: Settings) -> None:
    assert plan({"prompt": "x", "loras": []}, settings).ignored_parameters == ()


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("../outside.safetensors", "inside the server's LoRA folder"),
        ("styles/../../outside.safetensors", "inside the server's LoRA folder"),
        ("/etc/passwd", "inside the server's LoRA folder"),
        ("~/x.safetensors", "inside the server's LoRA folder"),
        ("styles\\pastel.safetensors", "inside the server's LoRA folder"),
        (".", "inside the server's LoRA folder"),
        ("https://huggingface.co/x/y.safetensors", "downloads nothing"),
        ("missing.safetensors", "there is no LoRA named"),
        ("escape.safetensors", "leads out of the server's LoRA folder"),
        ("escape-folder/outside.safetensors", "leads out of the server's LoRA folder"),
        ("pickled.ckpt", "not a .safetensors file"),
        ("fake.safetensors", "not a valid safetensors file"),
        ("huge.safetensors", "larger than this server's limit"),
        ("two-files", "holds 2 .safetensors files"),
    ],
)
def test_unsafe_unknown_and_unreadable_names_are_refused_before_the_job_queues(
    tmp_path: Path, lora_dir: Path, name: str, says: str
) -> None:
    outside = tmp_path / "outside.safetensors"
    save_peft_lora(outside, random_pairs(SHAPES, SHAPES, 4, seed=4))
    (lora_dir / "escape.safetensors").symlink_to(outside)
    (lora_dir / "escape-folder").symlink_to(tmp_path, target_is_directory=True)
    (lora_dir / "pickled.ckpt").write_bytes(b"\x80\x04pickle")
    (lora_dir / "fake.safetensors").write_bytes(b"\xff" * 64)
    big = random_pairs(SHAPES, SHAPES, 64, seed=5)
    save_peft_lora(lora_dir / "huge.safetensors", big)
    for i in range(2):
        save_peft_lora(
            lora_dir / "two-files" / f"{i}.safetensors", random_pairs(SHAPES, SHAPES, 2, i)
        )
    settings = make_settings(tmp_path, lora_dir=lora_dir, lora_max_bytes=200_000)
    error = refusal({"prompt": "x", "loras": [{"path": name}]}, settings)
    assert says in error.message and error.param == "loras.0.path"
    assert str(tmp_path) not in error.message


def test_a_link_that_stays_inside_the_folder_is_followed(lora_dir: Path, tmp_path: Path) -> None:
    (lora_dir / "alias.safetensors").symlink_to(lora_dir / "styles" / "pastel.safetensors")
    settings = make_settings(tmp_path, lora_dir=lora_dir)
    (lora,) = plan({"prompt": "x", "lora_weights": "alias.safetensors"}, settings).job.loras
    assert lora.file == str((lora_dir / "styles" / "pastel.safetensors").resolve())


def test_a_request_names_at_most_lora_cache_loras(lora_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, lora_dir=lora_dir, lora_cache=2)
    loras = [{"path": "outline.safetensors"}] * 3
    error = refusal({"prompt": "x", "loras": loras}, settings)
    assert error.message == "at most 2 LoRAs per request; got 3" and error.param == "loras"


def test_a_compiled_model_refuses_a_rank_past_its_slot_before_queueing(
    lora_settings: Settings,
) -> None:
    body = {"prompt": "x", "lora_weights": "styles/pastel.safetensors"}
    error = refusal(body, lora_settings, lora_max_rank=4)
    assert error.code == "invalid_lora" and "has rank 8" in error.message
    assert plan(body, lora_settings, lora_max_rank=8).job.loras


def test_a_replaced_file_is_a_new_version(lora_settings: Settings, lora_dir: Path) -> None:
    body = {"prompt": "x", "lora_weights": "outline.safetensors"}
    (first,) = plan(body, lora_settings).job.loras
    save_peft_lora(lora_dir / "outline.safetensors", random_pairs(SHAPES, SHAPES, 2, seed=7))
    os.utime(lora_dir / "outline.safetensors", ns=(1, 1))
    (second,) = plan(body, lora_settings).job.loras
    assert second.file == first.file and second.version != first.version


@pytest.fixture
def lora_server(lora_settings: Settings, fake_engine: FakeEngine) -> Iterator[str]:
    with live_server(create_app(lora_settings, fake_engine)) as url:
        yield url


def test_get_loras_lists_the_folder_in_the_openai_list_shape(lora_server: str) -> None:
    body = httpx.get(f"{lora_server}/v1/loras").json()
    assert body["object"] == "list"
    listed = {item["id"]: item for item in body["data"]}
    assert set(listed) == {
        "outline.safetensors",
        "styles/pastel.safetensors",
        "folder-lora/pytorch_lora_weights.safetensors",
    }
    pastel = listed["styles/pastel.safetensors"]
    assert pastel["object"] == "lora" and pastel["rank"] == 8 and pastel["valid"]
    assert pastel["loaded"] is False and pastel["size_bytes"] > 0
    document = httpx.get(f"{lora_server}/openapi.json").json()
    assert "get" in document["paths"]["/v1/loras"]
    properties = document["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert {"loras", "lora_weights", "lora_scale", "extra_lora", "extra_lora_scale"} <= set(
        properties
    )


def test_get_loras_is_an_empty_list_without_a_lora_folder(fake_server: str) -> None:
    assert httpx.get(f"{fake_server}/v1/loras").json() == {"object": "list", "data": []}


def test_a_refused_name_never_reaches_the_engine(lora_server: str, fake_engine: FakeEngine) -> None:
    answer = httpx.post(
        f"{lora_server}/v1/images/generations",
        json={"prompt": "x", "loras": [{"path": "../../etc/passwd"}]},
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "loras.0.path"
    assert fake_engine.jobs == []


def test_a_lora_the_engine_cannot_load_is_a_400_or_one_error_event(
    lora_settings: Settings,
) -> None:
    engine = FakeEngine(script=[InvalidLora("the LoRA 'outline.safetensors' is not valid")])
    with live_server(create_app(lora_settings, engine)) as url:
        client = sdk_client(url)
        extra_body = {"loras": [{"path": "outline.safetensors"}]}
        with pytest.raises(openai.BadRequestError) as raised:
            client.images.generate(prompt="x", extra_body=extra_body)
        assert raised.value.code == "invalid_lora" and raised.value.param == "loras"
        with pytest.raises(openai.APIError, match="is not valid"):
            list(client.images.generate(prompt="x", stream=True, extra_body=extra_body))
    job = engine.jobs[0]
    assert job.loras[0] == LoraRef(
        "outline.safetensors", job.loras[0].file, 1.0, job.loras[0].version
    )
