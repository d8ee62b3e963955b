"""The raw bytes of the stream, as any SSE client would read them."""

from __future__ import annotations

import json
import shutil
import time

import httpx
from sse_starlette import ServerSentEvent

from pipeline.jobs import JobFailed
from stream import sse
from stream.settings import Settings
from tests.fakes import FakeEngine


def raw_stream(base_url: str, body: dict[str, object]) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", f"{base_url}/v1/images/generations", json=body, timeout=30) as r:
        return r, r.read().decode()


def frames(text: str) -> list[list[str]]:
    return [block.split("\n") for block in text.split("\n\n") if block.strip()]


def test_every_frame_is_one_event_line_and_one_data_line_whose_type_matches(
    fake_server: str,
) -> None:
    response, text = raw_stream(
        fake_server, {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 2}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = frames(text)
    assert len(blocks) == 3
    for lines in blocks:
        assert len(lines) == 2
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        payload = json.loads(lines[1].removeprefix("data: "))
        assert payload["type"] == lines[0].removeprefix("event: ")
        assert "error" not in payload
        assert {"b64_json", "created_at", "size", "quality", "background", "output_format"} <= set(
            payload
        )
    assert "\nid:" not in "\n" + text and "\r" not in text


def test_completed_event_carries_usage(fake_server: str) -> None:
    _, text = raw_stream(fake_server, {"prompt": "a b c", "size": "64x64", "stream": True})
    (only,) = frames(text)
    payload = json.loads(only[1].removeprefix("data: "))
    assert payload["type"] == "image_generation.completed"
    usage = payload["usage"]
    assert usage["input_tokens_details"] == {"text_tokens": 3, "image_tokens": 0}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_failure_after_the_stream_started_is_one_error_frame(
    fake_server: str, fake_engine: FakeEngine
) -> None:
    fake_engine.script = [JobFailed("the image could not be generated")]
    response, text = raw_stream(fake_server, {"prompt": "x", "size": "64x64", "stream": True})
    assert response.status_code == 200
    (only,) = frames(text)
    assert only[0] == "event: error"
    payload = json.loads(only[1].removeprefix("data: "))
    assert payload == {
        "type": "error",
        "error": {
            "message": "the image could not be generated",
            "type": "server_error",
            "param": None,
            "code": None,
        },
    }


def test_a_server_fault_after_the_stream_started_is_one_generic_error_frame(
    fake_server: str, settings: Settings
) -> None:
    shutil.rmtree(settings.data_dir)
    settings.data_dir.write_text("a file where the result folder was: nothing can be stored")
    response, text = raw_stream(
        fake_server, {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 1}
    )
    assert response.status_code == 200
    partial, last = frames(text)
    assert partial[0] == "event: image_generation.partial_image"
    assert last[0] == "event: error"
    payload = json.loads(last[1].removeprefix("data: "))
    assert payload["error"] == {
        "message": "the server hit an internal error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    counted = 'fluxstream_jobs_total{outcome="failed"} 1.0'
    deadline = time.monotonic() + 10
    while counted not in httpx.get(f"{fake_server}/metrics").text:
        assert time.monotonic() < deadline, "the fault was not counted as a failed job"
        time.sleep(0.05)


def test_frames_written_by_hand_are_the_bytes_sse_starlette_would_write() -> None:
    """`stream.sse` writes frames itself, for speed; the wire format must not change."""
    payload = {"type": "image_generation.completed", "b64_json": "iVBO+/==", "note": "a\nb"}
    data = json.dumps(payload, separators=(",", ":"))
    reference = ServerSentEvent(data=data, event=payload["type"], sep="\n").encode()
    assert sse.event_frame(payload) == reference
    with_id = ServerSentEvent(data=data, event="completed", id="7", sep="\n").encode()
    assert sse.job_frame(7, "completed", payload) == with_id
    assert (
        sse.comment("queued position=2")
        == ServerSentEvent(comment="queued position=2", sep="\n").encode()
    )
