"""What operators and tools read: /metrics, the access log, /openapi.json, and a
schemathesis run against the served document (no 5xx, every error in the OpenAI shape)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from pipeline.engine import ThreadedEngine
from stream.app import create_app
from tests.conftest import make_settings
from tests.fakes import FakeEngine, StepRunner
from tests.servers import live_server

ERROR_KEYS = {"message", "type", "param", "code"}


def metric(text: str, name: str) -> float:
    """The value of one sample line `name value` in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_requests_by_route_jobs_previews_and_429s(tmp_path: Path) -> None:
    engine = ThreadedEngine(StepRunner(), max_queued=2)
    with live_server(create_app(make_settings(tmp_path), engine)) as url:
        body = {"prompt": "x", "size": "64x64", "num_inference_steps": 3}
        for _ in range(2):
            httpx.post(f"{url}/v1/images/generations", json=body)
        httpx.post(
            f"{url}/v1/images/generations", json={**body, "stream": True, "partial_images": 1}
        )
        httpx.get(f"{url}/v1/nowhere/{'x' * 10}")
        text = httpx.get(f"{url}/metrics").text
    assert 'route="/v1/images/generations",status="200"' in text
    assert 'status="404"' in text
    assert "/v1/nowhere" not in text  # labels are route templates, never raw paths
    assert metric(text, 'fluxstream_jobs_total{outcome="ok"}') == 3
    assert metric(text, "fluxstream_queue_depth") == 0
    assert metric(text, "fluxstream_jobs_running") == 0
    assert metric(text, "fluxstream_step_seconds_count") == 6  # 2 step gaps per 3-step job
    assert metric(text, "fluxstream_time_to_first_preview_seconds_count") == 1
    assert metric(text, "fluxstream_rate_limited_total") == 0


def test_429s_are_counted(fake_server: str, fake_engine: FakeEngine) -> None:
    fake_engine.full = True
    httpx.post(f"{fake_server}/v1/images/generations", json={"prompt": "x"})
    text = httpx.get(f"{fake_server}/metrics").text
    assert metric(text, "fluxstream_rate_limited_total") == 1
    assert 'route="/v1/images/generations",status="429"' in text


def test_two_apps_in_one_process_keep_separate_metrics(tmp_path: Path) -> None:
    first = create_app(make_settings(tmp_path / "a"), FakeEngine())
    second = create_app(make_settings(tmp_path / "b"), FakeEngine())
    with live_server(first) as a, live_server(second) as b:
        httpx.get(f"{a}/health")
        assert 'route="/health"' not in httpx.get(f"{b}/metrics").text


def test_access_log_has_one_structured_line_per_image_request(
    fake_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fluxstream.access"):
        httpx.post(
            f"{fake_server}/v1/images/generations",
            json={"prompt": "x", "size": "64x64", "num_inference_steps": 3},
            headers={"x-request-id": "req-abc"},
        )
    (record,) = [r for r in caplog.records if r.name == "fluxstream.access"]
    line = record.getMessage()
    for part in ("request_id=req-abc", "model=flux.1-dev", "size=64x64", "steps=3"):
        assert part in line
    assert "outcome=ok" in line and "queue_wait_ms=" in line and "run_ms=" in line


def test_openapi_document_describes_the_generation_request_model(fake_server: str) -> None:
    document = httpx.get(f"{fake_server}/openapi.json").json()
    assert document["openapi"].startswith("3.")
    operation = document["paths"]["/v1/images/generations"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    model = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert model["required"] == ["prompt"]
    assert {"size", "n", "stream", "partial_images", "seed"} <= set(model["properties"])


def test_openapi_document_describes_the_edit_file_parts(fake_server: str) -> None:
    document = httpx.get(f"{fake_server}/openapi.json").json()
    body = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    model_ref, files = body["multipart/form-data"]["schema"]["allOf"]
    assert model_ref["$ref"].endswith("/ImageEditRequest")
    assert files["properties"]["image"] == {"type": "string", "format": "binary"}
    assert files["properties"]["image[]"]["items"]["format"] == "binary"
    assert files["properties"]["mask"]["format"] == "binary"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_5xx_and_only_openai_shaped_errors(
    tmp_path: Path, mode: GenerationMode
) -> None:
    """Every POST route in the served document, with a bounded number of examples."""
    app = create_app(make_settings(tmp_path, max_pixels=256 * 256), FakeEngine())
    with live_server(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        posts = schema.include(method="POST")
        assert len(list(posts.get_all_operations())) >= 1

        @given(case=posts.as_strategy(generation_mode=mode))
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=url, timeout=30)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                assert set(response.json()["error"]) == ERROR_KEYS

        check()
