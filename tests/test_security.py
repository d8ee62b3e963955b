"""Hostile and careless clients: API keys, body and parameter limits, CORS, result names."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import openai
import pytest

from stream.app import create_app
from stream.settings import Settings
from tests.conftest import make_settings, sdk_client
from tests.fakes import FakeEngine
from tests.servers import live_server

KEY = "sk-test-0123456789"


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[str]:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# operators\nsk-from-file  # the demo page\n")
    settings = make_settings(tmp_path, api_keys=(KEY,), api_keys_file=keys_file)
    with live_server(create_app(settings, FakeEngine())) as url:
        yield url


def serve(settings: Settings) -> AbstractContextManager[str]:
    return live_server(create_app(settings, FakeEngine()))


def test_sdk_with_the_right_key_gets_images(keyed_server: str) -> None:
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY, max_retries=0)
    assert client.images.generate(prompt="x", size="64x64").data
    from_file = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="sk-from-file")
    assert "flux.1-dev" in [m.id for m in from_file.models.list()]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401_invalid_api_key_with_www_authenticate(
    keyed_server: str, headers: dict[str, str]
) -> None:
    response = httpx.post(
        f"{keyed_server}/v1/images/generations", json={"prompt": "x"}, headers=headers
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")


def test_sdk_raises_authentication_error_on_a_wrong_key(keyed_server: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk_client(keyed_server).models.list()


def test_a_key_in_the_query_opens_get_requests_only(keyed_server: str) -> None:
    """For browsers' `EventSource`, which cannot send headers (the demo page's job events)."""
    assert httpx.get(f"{keyed_server}/v1/models?api_key={KEY}").status_code == 200
    assert httpx.get(f"{keyed_server}/v1/models?api_key=wrong").status_code == 401
    posted = httpx.post(f"{keyed_server}/v1/images/generations?api_key={KEY}", json={"prompt": "x"})
    assert posted.status_code == 401


def test_every_v1_route_is_protected_even_unknown_ones(keyed_server: str) -> None:
    assert httpx.get(f"{keyed_server}/v1/models").status_code == 401
    assert httpx.get(f"{keyed_server}/v1/jobs/anything").status_code == 401


def test_health_metrics_and_result_files_stay_open(keyed_server: str) -> None:
    assert httpx.get(f"{keyed_server}/health").status_code == 200
    assert httpx.get(f"{keyed_server}/metrics").status_code == 200
    assert httpx.get(f"{keyed_server}/v1/images/files/{'a' * 32}.png").status_code == 404


def test_json_body_over_the_limit_is_413_even_without_content_length(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_body_bytes=1000)
    chunks = [b'{"prompt": "', b"x" * 600, b"x" * 600, b'"}']
    with serve(settings) as url:
        declared = httpx.post(f"{url}/v1/images/generations", content=b"".join(chunks))
        chunked = httpx.post(f"{url}/v1/images/generations", content=iter(chunks))
        small = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64"})
    assert declared.status_code == chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200


def test_a_lying_content_length_does_not_get_past_the_limit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_body_bytes=1000)
    body = b'{"prompt": "' + b"x" * 5000 + b'"}'
    with serve(settings) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + f"{len(body):x}\r\n".encode()
                + body
                + b"\r\n0\r\n\r\n"
            )
            reply = client.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413")


def test_multipart_body_over_the_limit_is_413(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_body_bytes=1000)
    with serve(settings) as url:
        response = httpx.post(
            f"{url}/v1/images/edits",
            files={"image": ("a.png", b"\x89PNG" + b"0" * 4000, "image/png")},
            data={"prompt": "x"},
        )
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("overrides", "body", "param"),
    [
        ({"max_prompt_chars": 10}, {"prompt": "x" * 11}, "prompt"),
        # Texts passed through to the pipeline are prompts too: 10 MB cost minutes to tokenize.
        ({"max_prompt_chars": 10}, {"prompt": "x", "negative_prompt": "x" * 11}, "negative_prompt"),
        ({"max_n": 2}, {"prompt": "x", "n": 3}, "n"),
        ({"max_steps": 5}, {"prompt": "x", "num_inference_steps": 6}, "num_inference_steps"),
        ({"max_pixels": 64 * 64}, {"prompt": "x", "size": "128x128"}, "size"),
    ],
)
def test_each_request_limit_is_a_named_setting_answered_with_400(
    tmp_path: Path, overrides: dict[str, int], body: dict[str, object], param: str
) -> None:
    with serve(make_settings(tmp_path, **overrides)) as url:
        response = httpx.post(f"{url}/v1/images/generations", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_cors_is_off_by_default(fake_server: str) -> None:
    response = httpx.get(f"{fake_server}/v1/models", headers={"Origin": "https://example.com"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_only_listed_origins(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, cors_allow_origins=("https://ok.example",))
    preflight = {"Access-Control-Request-Method": "POST"}
    with serve(settings) as url:
        allowed = httpx.options(
            f"{url}/v1/images/generations", headers={"Origin": "https://ok.example", **preflight}
        )
        refused = httpx.options(
            f"{url}/v1/images/generations", headers={"Origin": "https://evil.example", **preflight}
        )
    assert allowed.headers["access-control-allow-origin"] == "https://ok.example"
    assert "access-control-allow-origin" not in refused.headers


def test_result_files_serve_only_names_the_server_wrote(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with serve(settings) as url:
        images = settings.data_dir
        (images / ".partial-abc").write_bytes(b"half")
        (tmp_path / "secret.png").write_bytes(b"secret")
        for name in (".partial-abc", "..%2Fsecret.png", "%2e%2e/secret.png", "x" * 40):
            assert httpx.get(f"{url}/v1/images/files/{name}").status_code == 404
