"""`python -m stream.cluster`: two Ray Serve replicas of the real app behind Ray's proxy.

One cluster (a local Ray head, Redis for shared state, the embedded model) serves the whole
module; starting it costs about half a minute on two cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import make_settings, sdk_client
from tests.redis_server import redis_server
from tests.servers import free_port, stop, wait_healthy
from tests.test_jobs_api import events_of

pytest.importorskip("ray.serve", reason="Ray Serve comes with the cluster extra")

STEPS = {"num_inference_steps": 24}


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Cluster:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    port = free_port()
    with redis_server() as redis_url:
        command = [
            sys.executable,
            "-m",
            "stream.cluster",
            "--replicas",
            "2",
            "--port",
            str(port),
            "--cache-dir",
            str(root / "cache"),
            "--data-dir",
            str(root / "images"),
            "--state-store",
            "redis",
            "--redis-url",
            redis_url,
            "--no-warmup",
        ]
        environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        process = subprocess.Popen(command, env=environment, start_new_session=True)
        running = Cluster(process, port)
        try:
            wait_healthy(running.url, process, timeout_s=240)
            yield running
        finally:
            stop(process, kill=lambda: os.killpg(process.pid, signal.SIGKILL))


def test_without_ray_address_it_starts_its_own_head_instead_of_joining_one_running_here(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ray's default (`address=None`) joins any cluster `ray start` left on this machine,
    where `serve.start` keeps that cluster's port and Ctrl-C would shut its Serve down."""
    import ray

    from stream import cluster

    addresses: list[str | None] = []

    def init(address: str | None = None, **options: object) -> None:
        addresses.append(address)
        raise InterruptedError  # stop before anything starts

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(cluster.PROXY_CALLBACK_VARIABLE, cluster.PROXY_CALLBACK)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(InterruptedError):
        cluster.deploy(make_settings(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(InterruptedError):
        cluster.deploy(make_settings(tmp_path))
    assert addresses == ["local", "10.0.0.1:6379"]


def test_sdk_stream_through_the_proxy_delivers_previews_as_they_form(cluster: Cluster) -> None:
    started = time.monotonic()
    arrivals: list[tuple[str, float]] = []
    # Enough steps that the previews are far apart in time even on a loaded machine.
    for event in sdk_client(cluster.url).images.generate(
        prompt="a lighthouse",
        size="256x256",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 96},
    ):
        arrivals.append((event.type, time.monotonic() - started))
    kinds = [kind for kind, _ in arrivals]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    first_preview, completed = arrivals[0][1], arrivals[-1][1]
    # A proxy that buffered the response would deliver every event at the very end.
    assert completed - first_preview > 0.3 * completed


def test_concurrent_requests_are_spread_over_both_replicas_and_urls_work_anywhere(
    cluster: Cluster,
) -> None:
    client = sdk_client(cluster.url)

    def generate(index: int) -> tuple[str, str]:
        response = client.images.with_raw_response.generate(
            prompt=f"a fox {index}", size="128x128", extra_body={"num_inference_steps": 8}
        )
        url = response.parse().data[0].url  # type: ignore[index]
        assert url is not None
        return response.headers["x-fluxstream-replica"], url

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(generate, range(8)))
    assert len({replica for replica, _ in served}) == 2
    for _, url in served:
        download = httpx.get(url, timeout=30)
        assert download.status_code == 200 and download.content.startswith(b"\x89PNG")


def test_the_request_id_comes_back_once_through_the_proxy(cluster: Cluster) -> None:
    response = sdk_client(cluster.url).models.with_raw_response.list(
        extra_headers={"x-request-id": "req-mine"}
    )
    assert response.headers.get_list("x-request-id") == ["req-mine"]
    assert response.request_id == "req-mine"


def test_job_started_through_one_replica_resumes_through_the_other(cluster: Cluster) -> None:
    created = httpx.post(
        f"{cluster.url}/v1/images/jobs",
        json={"prompt": "a city", "size": "128x128", "partial_images": 2, **STEPS},
        timeout=30,
    )
    assert created.status_code == 202
    origin = created.headers["x-fluxstream-replica"]
    job = created.json()
    for _ in range(100):
        with httpx.stream("GET", job["events_url"], timeout=60) as response:
            if response.headers["x-fluxstream-replica"] != origin:
                break
    else:
        raise AssertionError("the router never sent the events request to the other replica")
    events = events_of(job["events_url"])
    assert events[-1].name == "completed"
    resumed = events_of(job["events_url"], headers={"Last-Event-ID": events[-2].id or ""})
    assert [event.name for event in resumed] == ["completed"]


def test_a_killed_replica_ends_its_stream_and_the_other_keeps_serving(cluster: Cluster) -> None:
    """The replica dies mid-stream; the proxy's guard still ends the stream with an OpenAI
    `error` frame, which the SDK raises as an APIError within seconds."""
    stream = sdk_client(cluster.url).images.generate(
        prompt="a storm",
        size="1024x1024",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 100},
    )
    events = iter(stream)
    assert next(events).type == "image_generation.partial_image"
    replica = stream.response.headers["x-fluxstream-replica"]  # id@host:pid
    os.kill(int(replica.rsplit(":", 1)[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(openai.APIError) as raised:
        for event in events:
            assert event.type != "image_generation.completed"
    assert not isinstance(raised.value, openai.APIConnectionError)
    assert "replica running this request stopped" in raised.value.message
    assert time.monotonic() - killed_at < 30
    after = httpx.post(
        f"{cluster.url}/v1/images/generations",
        json={"prompt": "after", "size": "64x64", "num_inference_steps": 2},
        timeout=60,
    )
    assert after.status_code == 200


def test_stopping_the_cluster_frees_the_port(cluster: Cluster) -> None:
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(timeout=90) == 0
    assert port_is_free(cluster.port)
