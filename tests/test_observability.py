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
from pipeline.jobs import (
    EngineClosed,
    EngineError,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    Progress,
    QueueTimeout,
)
from stream.app import create_app
from tests.conftest import make_settings
from tests.fakes import FakeEngine, StepRunner
from tests.servers import live_server

ERROR_KEYS = {"message", "type", "param", "code"}
REQUESTS = "fluxstream_http_requests_total"


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


def test_methods_outside_http_are_counted_as_other_so_a_scan_cannot_add_series(
    fake_server: str,
) -> None:
    """WebDAV's methods pass both of uvicorn's HTTP parsers (h11 passes any token)."""
    for method in ("PROPFIND", "PURGE", "GET"):
        httpx.request(method, f"{fake_server}/v1/nowhere")
    text = httpx.get(f"{fake_server}/metrics").text
    assert "PROPFIND" not in text and "PURGE" not in text
    counted = [line for line in text.splitlines() if line.startswith(REQUESTS)]
    assert sum(float(line.split()[-1]) for line in counted if 'method="other"' in line) == 2
    assert metric(text, f'{REQUESTS}{{method="GET",route="/v1/{{path:path}}",status="404"}}') == 1


def test_every_job_outcome_is_a_series_from_the_start(fake_server: str) -> None:
    """So that `increase(...{outcome="failed"}[5m])` sees the first failure."""
    text = httpx.get(f"{fake_server}/metrics").text
    for outcome in ("ok", "failed", "cancelled", "disconnected", "queue_timeout"):
        assert metric(text, f'fluxstream_jobs_total{{outcome="{outcome}"}}') == 0
    for outcome in ("job_timeout", "shutdown"):
        assert metric(text, f'fluxstream_jobs_total{{outcome="{outcome}"}}') == 0


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (JobFailed("boom"), "failed"),
        (JobCancelled("gone"), "cancelled"),
        (QueueTimeout("waited"), "queue_timeout"),
        (JobTimedOut("ran"), "job_timeout"),
        (EngineClosed("bye"), "shutdown"),
    ],
)
def test_a_job_that_ends_in_an_engine_error_is_counted_and_logged_by_its_outcome(
    fake_server: str,
    fake_engine: FakeEngine,
    caplog: pytest.LogCaptureFixture,
    error: EngineError,
    outcome: str,
) -> None:
    fake_engine.script = [Progress(1, 2), error]
    with caplog.at_level(logging.INFO, logger="fluxstream.access"):
        httpx.post(f"{fake_server}/v1/images/generations", json={"prompt": "x", "size": "64x64"})
    text = httpx.get(f"{fake_server}/metrics").text
    assert metric(text, f'fluxstream_jobs_total{{outcome="{outcome}"}}') == 1
    (record,) = [r for r in caplog.records if r.name == "fluxstream.access"]
    assert f"outcome={outcome} " in record.getMessage()


def test_a_job_deleted_through_the_jobs_api_is_counted_as_cancelled_not_disconnected(
    fake_server: str, fake_engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    fake_engine.release.clear()
    with caplog.at_level(logging.INFO, logger="fluxstream.access"):
        job = httpx.post(f"{fake_server}/v1/images/jobs", json={"prompt": "x", "size": "64x64"})
        job_id = job.json()["id"]
        httpx.delete(f"{fake_server}/v1/images/jobs/{job_id}")
        text = httpx.get(f"{fake_server}/metrics").text
    assert metric(text, 'fluxstream_jobs_total{outcome="cancelled"}') == 1
    assert metric(text, 'fluxstream_jobs_total{outcome="disconnected"}') == 0
    assert metric(text, "fluxstream_jobs_cancelled_total") == 1
    (record,) = [r for r in caplog.records if r.name == "fluxstream.access"]
    assert f"request_id={job_id} " in record.getMessage()
    assert "outcome=cancelled " in record.getMessage()


def test_a_request_id_with_spaces_cannot_forge_access_log_fields(
    fake_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fluxstream.access"):
        response = httpx.post(
            f"{fake_server}/v1/images/generations",
            json={"prompt": "x", "size": "64x64"},
            headers={"x-request-id": "mine outcome=forged"},
        )
    (record,) = [r for r in caplog.records if r.name == "fluxstream.access"]
    assert "forged" not in record.getMessage()
    assert response.headers["x-request-id"].startswith("req_")
    assert f"request_id={response.headers['x-request-id']} " in record.getMessage()


def test_step_buckets_reach_the_seconds_a_step_takes_on_a_cpu_or_offloaded(
    fake_server: str,
) -> None:
    text = httpx.get(f"{fake_server}/metrics").text
    assert 'fluxstream_step_seconds_bucket{le="0.001"}' in text  # the embedded model
    assert 'fluxstream_step_seconds_bucket{le="60.0"}' in text  # full FLUX on a CPU


def test_openapi_document_is_valid_openapi_3_1(fake_server: str) -> None:
    schemathesis.openapi.from_url(f"{fake_server}/openapi.json").validate()


def test_openapi_document_lists_every_route_with_its_real_status_and_media_types(
    fake_server: str,
) -> None:
    paths = httpx.get(f"{fake_server}/openapi.json").json()["paths"]
    assert set(paths["/v1/images/jobs"]["post"]["responses"]) == {"202", "default"}
    assert set(paths["/v1/images/jobs/{job_id}"]) == {"get", "delete"}
    events = paths["/v1/images/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert set(events) == {"text/event-stream"}
    files = paths["/v1/images/files/{name}"]["get"]["responses"]["200"]["content"]
    assert "image/png" in files
    assert "get" in paths["/v1/models/{model}"]
    health = paths["/health"]["get"]["responses"]
    assert set(health) == {"200", "503"}
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    assert "get" in paths["/openapi.json"]
    generations = paths["/v1/images/generations"]["post"]
    assert generations["security"] == [{"bearer": []}]
    assert "security" not in paths["/health"]["get"]
