"""HTTP behaviour with a scripted engine: status codes, error shapes, headers."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from stream.app import create_app
from stream.settings import Settings
from tests.conftest import make_settings, sdk_client
from tests.fakes import PROFILE, FakeEngine
from tests.servers import live_server


def post(base_url: str, body: object) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=30)


def test_queue_full_is_429_with_retry_after_before_any_stream_byte(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.full = True
    response = post(fake_server, {"prompt": "x", "stream": True})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "8"
    assert response.headers["retry-after-ms"] == "8000"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_sdk_raises_rate_limit_error_on_429_with_openai_code(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.full = True
    with pytest.raises(openai.RateLimitError) as raised:
        sdk_client(fake_server).images.generate(prompt="x")
    assert (raised.value.code, raised.value.type) == ("rate_limit_exceeded", "rate_limit_error")


def test_null_fields_mean_default(fake_server: str, fake_engine: FakeEngine) -> None:
    body = {
        "prompt": "x",
        "n": None,
        "size": None,
        "seed": None,
        "response_format": None,
        "stream": None,
        "partial_images": None,
        "num_inference_steps": None,
    }
    response = post(fake_server, body)
    assert response.status_code == 200
    (job,) = fake_engine.jobs
    assert (job.width, job.height) == (1024, 1024)
    assert job.num_inference_steps == 4 and job.num_images == 1
    assert "url" in response.json()["data"][0]


def test_unknown_model_is_404_model_not_found(fake_server: str) -> None:
    response = post(fake_server, {"prompt": "x", "model": "dall-e-9"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}",  # over Python's int digit limit
        b'{"prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep
    ],
)
def test_malformed_body_is_400(fake_server: str, body: bytes) -> None:
    response = httpx.post(f"{fake_server}/v1/images/generations", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_a_form_encoded_body_is_a_400_that_says_how_it_was_sent(
    fake_server: str, path: str
) -> None:
    response = httpx.post(f"{fake_server}{path}", data={"prompt": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "the request body is not valid JSON (it was sent as application/x-www-form-urlencoded)"
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "a \\ud83d b", "stream": true}', "prompt"),  # half an emoji, as cut by JS
        (b'{"prompt": "a", "negative_prompt": ["\\udc80"]}', "negative_prompt"),
        (b'{"prompt": "a", "\\udc80": 1}', None),
    ],
)
def test_text_that_is_not_unicode_is_a_400_before_anything_runs(
    fake_server: str, fake_engine: FakeEngine, body: bytes, param: str | None
) -> None:
    response = httpx.post(f"{fake_server}/v1/images/generations", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "lone surrogate" in error["message"]
    assert fake_engine.jobs == []


def test_escaped_surrogate_pairs_are_the_characters_they_encode(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    body = json.dumps({"prompt": "a \U0001f600"})  # ensure_ascii: "a \\ud83d\\ude00"
    httpx.post(f"{fake_server}/v1/images/generations", content=body)
    assert fake_engine.jobs[0].prompt == "a \U0001f600"


def test_every_response_has_a_request_id(fake_server: str) -> None:
    assert httpx.get(f"{fake_server}/health").headers["x-request-id"].startswith("req_")
    echoed = httpx.get(f"{fake_server}/health", headers={"x-request-id": "abc"})
    assert echoed.headers["x-request-id"] == "abc"


def test_an_unexpected_fault_is_a_generic_500_that_still_carries_the_request_id(
    fake_server: str, settings: Settings
) -> None:
    shutil.rmtree(settings.data_dir)
    settings.data_dir.write_text("a file where the result folder was: nothing can be stored")
    response = httpx.post(
        f"{fake_server}/v1/images/generations",
        json={"prompt": "x", "size": "64x64"},
        headers={"x-request-id": "req-from-client"},
    )
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "the server hit an internal error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert response.headers["x-request-id"] == "req-from-client"
    metrics = httpx.get(f"{fake_server}/metrics").text
    assert 'route="/v1/images/generations",status="500"} 1.0' in metrics


def test_a_failing_sweep_is_logged_and_the_server_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, sweep_interval_s=0.01)
    with live_server(create_app(settings, FakeEngine())) as url:
        shutil.rmtree(settings.data_dir)  # a tmp cleaner took the result folder
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "sweep failed" not in caplog.text:
            if httpx.get(f"{url}/health").json()["status"] != "ok":
                break
            time.sleep(0.02)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nothing-here"),
        ("POST", "/v1/images/variations"),
        ("POST", "/v1/images/generations/"),
        ("GET", "/v1/images/generations"),
    ],
)
def test_unknown_route_is_an_openai_shaped_404(fake_server: str, method: str, path: str) -> None:
    response = httpx.request(method, f"{fake_server}{path}", json={"prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": f"Invalid URL ({method} {path})",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_sdk_calls_to_endpoints_this_server_lacks_raise_not_found(fake_server: str) -> None:
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        sdk_client(fake_server).embeddings.create(model="flux.1-dev", input="x")


def test_expired_or_unknown_result_file_is_404(fake_server: str) -> None:
    assert httpx.get(f"{fake_server}/v1/images/files/../../etc/passwd").status_code == 404
    assert httpx.get(f"{fake_server}/v1/images/files/{'a' * 32}.png").status_code == 404


def test_multiple_images_each_carry_their_seed(fake_server: str, fake_engine: FakeEngine) -> None:
    response = post(fake_server, {"prompt": "x", "n": 3, "seed": 10, "response_format": "b64_json"})
    assert [item["seed"] for item in response.json()["data"]] == [10, 11, 12]


def test_demo_page_is_served_at_root(fake_server: str) -> None:
    response = httpx.get(f"{fake_server}/")
    assert response.status_code == 200
    assert "fluxstream" in response.text


def test_health_is_503_until_the_engine_is_ready(fake_server: str, fake_engine: FakeEngine) -> None:
    assert httpx.get(f"{fake_server}/health").json()["status"] == "ok"
    fake_engine.closed = True
    response = httpx.get(f"{fake_server}/health")
    assert response.status_code == 503
    assert response.json()["status"] == "closed"


def test_preview_decoder_comes_from_the_request_or_the_server_default(tmp_path: Path) -> None:
    engine = FakeEngine()
    settings = make_settings(tmp_path, preview_decoder="vae")
    with live_server(create_app(settings, engine)) as url:
        for preview in (None, "linear"):
            body = {"prompt": "x", "stream": True, "partial_images": 1, "preview": preview}
            assert post(url, body).status_code == 200
    assert [job.preview_decoder for job in engine.jobs] == ["vae", "linear"]


@pytest.mark.parametrize(
    ("decoders", "auto", "expected"),
    [
        (("linear", "vae"), "linear", "linear"),
        (("linear", "vae", "tiny"), "tiny", "tiny"),
        (("linear", "vae", "tiny"), "linear", "linear"),  # the embedded model's own tiny
    ],
)
def test_default_previews_use_the_model_s_auto_decoder(
    tmp_path: Path, decoders: tuple[str, ...], auto: str, expected: str
) -> None:
    profile = dataclasses.replace(PROFILE, preview_decoders=decoders, auto_preview=auto)
    engine = FakeEngine(profile=profile)
    with live_server(create_app(make_settings(tmp_path), engine)) as url:
        body = {"prompt": "x", "stream": True, "partial_images": 1}
        assert post(url, body).status_code == 200
    assert [job.preview_decoder for job in engine.jobs] == [expected]


@pytest.mark.parametrize("preview", ["fancy", "tiny", ""])
def test_unknown_or_unavailable_preview_decoder_is_400_on_preview(
    fake_server: str, preview: str
) -> None:
    body = {"prompt": "x", "stream": True, "partial_images": 1, "preview": preview}
    response = post(fake_server, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "preview"
    assert error["message"] == f"preview must be one of linear, vae; got {preview!r}"


def test_server_may_allow_more_partial_images_than_openai(tmp_path: Path) -> None:
    engine = FakeEngine()
    settings = make_settings(tmp_path, max_partial_images=50)
    with live_server(create_app(settings, engine)) as url:
        events = list(
            sdk_client(url).images.generate(
                prompt="x",
                size="256x256",
                stream=True,
                partial_images=7,
                extra_body={"num_inference_steps": 8},
            )
        )
        too_many = post(url, {"prompt": "x", "stream": True, "partial_images": 51})
    assert [event.type for event in events].count("image_generation.partial_image") == 7
    assert too_many.status_code == 400


def test_health_tells_the_demo_page_how_many_previews_it_may_ask_for(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_partial_images=1)
    with live_server(create_app(settings, FakeEngine())) as url:
        assert httpx.get(f"{url}/health").json()["max_partial_images"] == 1


def test_models_offer_the_demo_page_the_models_example_prompts(tmp_path: Path) -> None:
    examples = ("a red circle on a blue background", "a large green tree at night")
    engine = FakeEngine(profile=dataclasses.replace(PROFILE, example_prompts=examples))
    with live_server(create_app(make_settings(tmp_path), engine)) as url:
        listed = httpx.get(f"{url}/v1/models").json()["data"]
        one = httpx.get(f"{url}/v1/models/flux.1-dev").json()
        retrieved = sdk_client(url).models.retrieve("flux.1-dev")
    assert listed and all(card["example_prompts"] == list(examples) for card in listed)
    assert set(one) == {"id", "object", "created", "owned_by", "example_prompts"}
    assert one["example_prompts"] == list(examples)
    assert (retrieved.id, retrieved.owned_by) == ("flux.1-dev", "fluxstream")
    assert (retrieved.model_extra or {})["example_prompts"] == list(examples)


def test_a_model_without_examples_lists_none(fake_server: str) -> None:
    cards = httpx.get(f"{fake_server}/v1/models").json()["data"]
    assert cards and all(card["example_prompts"] == [] for card in cards)
