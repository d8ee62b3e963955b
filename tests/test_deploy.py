"""The deployment files: the Dockerfile, compose.yaml, deploy/serve.yaml and the KubeRay
RayService, read as their tools read them, and deploy/serve.yaml run by `serve run` on the
embedded model (CPU), with one request streamed through Ray's proxy.

`make lint` runs hadolint, yamllint and kubernetes-validate over the same files, and
`make image-test` builds and runs the image itself.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from stream import cluster
from stream.healthcheck import health_url
from stream.settings import Settings
from tests.redis_server import redis_server
from tests.servers import free_port, wait_healthy
from tests.test_jobs_api import sse_events

ROOT = Path(__file__).resolve().parent.parent
SERVE_YAML = ROOT / "deploy" / "serve.yaml"
RAYSERVICE_YAML = ROOT / "deploy" / "rayservice.yaml"
COMPOSE_YAML = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_YAML.read_text())


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    """deploy/rayservice.yaml's objects by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RAYSERVICE_YAML.read_text())}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_YAML.read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#")]
    joined = re.sub(r"\\\n\s*", "", "\n".join(lines))
    return [
        (keyword.upper(), rest.strip())
        for keyword, _, rest in (line.strip().partition(" ") for line in joined.splitlines())
        if keyword
    ]


def instructions(name: str) -> list[str]:
    return [rest for keyword, rest in dockerfile() if keyword == name]


def instruction(name: str) -> str:
    (arguments,) = instructions(name)
    return arguments


def fluxstream_variables(text: str) -> set[str]:
    return set(re.findall(r"\bFLUXSTREAM_([A-Z_]+)\b", text))


def the_app(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    return dict(app)


# deploy/serve.yaml and the RayService


def test_the_rayservice_serves_the_same_application_as_deploy_serve_yaml() -> None:
    service = kubernetes_objects()["RayService"]
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config()


def test_the_rayservice_runs_the_ray_version_the_image_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["optional-dependencies"]["cluster"] if d.startswith("ray[")]
    service = kubernetes_objects()["RayService"]
    assert pin == f"ray[serve]=={service['spec']['rayClusterConfig']['rayVersion']}"


def test_the_rayservice_reaches_redis_through_its_service() -> None:
    objects = kubernetes_objects()
    redis = objects["Service"]
    assert redis["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    expected = f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    cluster_config = objects["RayService"]["spec"]["rayClusterConfig"]
    pods = [cluster_config["headGroupSpec"], *cluster_config["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert {"name": "FLUXSTREAM_REDIS_URL", "value": expected} in container["env"]


def test_the_rayservice_gpu_workers_hold_one_gpu_for_each_replica() -> None:
    cluster_config = kubernetes_objects()["RayService"]["spec"]["rayClusterConfig"]
    (workers,) = cluster_config["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (deployment,) = the_app(serve_config())["deployments"]
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    assert workers["maxReplicas"] == deployment["autoscaling_config"]["max_replicas"]


def test_the_serve_config_is_valid_for_ray_serve() -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve: the cluster extra")
    parsed = schema.ServeDeploySchema.model_validate(serve_config())
    (deployment,) = parsed.applications[0].deployments
    assert deployment.name == cluster.APP_NAME


def test_the_serve_config_builds_the_app_from_settings_by_field_name() -> None:
    app = the_app(serve_config())
    assert app["import_path"] == "stream.cluster:build"
    settings = Settings(**app["args"])
    assert settings.state_store == "redis"
    assert settings.model == "/models/FLUX.1-dev"


def test_the_serve_config_wraps_the_proxies_in_the_stream_guard() -> None:
    variables = serve_config()["controller_options"]["runtime_env"]["env_vars"]
    assert variables == {cluster.PROXY_CALLBACK_VARIABLE: cluster.PROXY_CALLBACK}


# compose.yaml


def test_compose_gives_each_server_one_gpu_of_its_own() -> None:
    servers = {n: s for n, s in compose()["services"].items() if n.startswith("fluxstream")}
    gpus = []
    for server in servers.values():
        (device,) = server["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
    assert len(servers) == 2 and sorted(gpus) == ["0", "1"]


def test_compose_wires_the_servers_to_its_redis_once_it_is_healthy() -> None:
    services = compose()["services"]
    for name in ("fluxstream", "fluxstream-2"):
        server = services[name]
        assert server["environment"] == {
            "FLUXSTREAM_STATE_STORE": "redis",
            "FLUXSTREAM_REDIS_URL": "redis://redis:6379/0",
        }
        assert server["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert server["restart"] == "unless-stopped"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["redis"]["restart"] == "unless-stopped"


def test_compose_lets_a_stopping_server_drain_before_it_is_killed() -> None:
    from stream.cli import FLUSH_TIMEOUT_S, SHUTDOWN_TIMEOUT_S

    grace_s = Settings.model_fields["shutdown_grace_s"].default
    drain_s = grace_s + FLUSH_TIMEOUT_S + SHUTDOWN_TIMEOUT_S
    grace = compose()["services"]["fluxstream"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace.removesuffix("s")) >= drain_s


def test_every_fluxstream_variable_in_the_deployment_files_is_a_setting() -> None:
    texts = [DOCKERFILE, COMPOSE_YAML, RAYSERVICE_YAML, SERVE_YAML]
    named = set().union(*(fluxstream_variables(path.read_text()) for path in texts))
    assert named >= {"HOST", "PORT", "CACHE_DIR", "DATA_DIR", "STATE_STORE", "REDIS_URL"}
    assert {name.lower() for name in named} <= set(Settings.model_fields)


# The Dockerfile


def test_the_image_serves_on_every_interface_at_8000_with_state_in_cache() -> None:
    environment = " ".join(instructions("ENV")).split()
    for setting in [
        "FLUXSTREAM_HOST=0.0.0.0",
        "FLUXSTREAM_PORT=8000",
        "FLUXSTREAM_CACHE_DIR=/cache",
        "FLUXSTREAM_DATA_DIR=/cache/images",
    ]:
        assert setting in environment
    assert instruction("EXPOSE") == "8000"
    assert instruction("VOLUME") == '["/models", "/cache"]'
    assert instruction("ENTRYPOINT") == '["fluxstream"]'


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    user = instruction("USER")
    assert re.fullmatch(r"[1-9]\d*:\d+", user), user


def test_the_image_health_check_gives_warming_a_start_period() -> None:
    check = instruction("HEALTHCHECK")
    assert re.search(r"--start-period=\d+m", check)
    assert check.endswith('CMD ["python", "-m", "stream.healthcheck"]')
    assert health_url({"FLUXSTREAM_HOST": "0.0.0.0", "FLUXSTREAM_PORT": "8000"}).endswith(
        "127.0.0.1:8000/health"
    )


def test_the_image_installs_torch_then_the_dependencies_before_copying_the_code() -> None:
    """A change to the code must not reinstall torch or the other dependencies."""
    steps = dockerfile()
    torch = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "torch==" in rest)
    dependencies = next(i for i, (k, rest) in enumerate(steps) if "requirements.txt" in rest)
    copies = [i for i, (k, rest) in enumerate(steps) if k == "COPY"]
    assert steps[copies[0]] == ("COPY", "pyproject.toml ./")
    assert torch < copies[0] < dependencies < copies[1]


def test_the_dockerignore_sends_only_the_project_and_its_model() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*"
    kept = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert kept == {"pyproject.toml", "README.md", "stream", "pipeline", "web"}
    model = ROOT / "pipeline" / "embedded" / "model" / "model_index.json"
    assert model.is_file(), "the embedded model ships inside pipeline/"


# `serve run deploy/serve.yaml`, on the embedded model


class ServeRun:
    def __init__(self, process: subprocess.Popen[bytes], url: str, redis_url: str) -> None:
        self.process = process
        self.url = url
        self.redis_url = redis_url


def cpu_variant(config: dict[str, Any], port: int, root: Path) -> dict[str, Any]:
    """deploy/serve.yaml for this machine: no GPU, the embedded model, one replica."""
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"] |= {
        "model": "embedded",
        "warmup": False,
        "cache_dir": str(root / "cache"),
        "data_dir": str(root / "images"),
    }
    (deployment,) = app["deployments"]
    deployment["ray_actor_options"]["num_gpus"] = 0
    deployment["autoscaling_config"]["max_replicas"] = 1
    return config


@pytest.fixture(scope="module")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeRun]:
    pytest.importorskip("ray.serve", reason="Ray Serve comes with the cluster extra")
    root = tmp_path_factory.mktemp("serve-run")
    port = free_port()
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump(cpu_variant(serve_config(), port, root)))
    with redis_server() as redis_url:
        # Neither a cluster to join nor the proxy variable: the config file must set it.
        environment = {
            name: value
            for name, value in os.environ.items()
            if name not in {"RAY_ADDRESS", cluster.PROXY_CALLBACK_VARIABLE}
        }
        environment["FLUXSTREAM_REDIS_URL"] = redis_url
        serve = Path(sys.executable).parent / "serve"
        process = subprocess.Popen(
            [str(serve), "run", "--address", "local", str(config)],
            env=environment,
            cwd=root,
            start_new_session=True,
        )
        running = ServeRun(process, f"http://127.0.0.1:{port}", redis_url)
        try:
            wait_healthy(running.url, process, timeout_s=240)
            yield running
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # `serve run` shuts Serve and Ray down
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def test_serve_run_of_the_config_streams_a_generation_through_the_guarded_proxy(
    serve_run: ServeRun,
) -> None:
    """The request id comes back once only when the proxy runs stream.proxy_guard's
    middlewares, which the config file's controller_options wire in."""
    body = {
        "prompt": "a lighthouse at dusk",
        "size": "128x128",
        "stream": True,
        "partial_images": 2,
        "num_inference_steps": 8,
    }
    with httpx.stream(
        "POST",
        f"{serve_run.url}/v1/images/generations",
        json=body,
        headers={"x-request-id": "req-deploy"},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get_list("x-request-id") == ["req-deploy"]
        events = list(sse_events(response))
    assert [event.data["type"] for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert base64.b64decode(events[-1].data["b64_json"]).startswith(b"\x89PNG")


def test_serve_run_takes_the_redis_url_from_the_environment_it_builds_the_app_in(
    serve_run: ServeRun,
) -> None:
    """deploy/serve.yaml names no Redis: FLUXSTREAM_REDIS_URL, as KubeRay's pods set it."""
    import redis

    response = httpx.post(
        f"{serve_run.url}/v1/images/generations",
        json={"prompt": "a fox", "size": "64x64", "num_inference_steps": 2},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    name = response.json()["data"][0]["url"].rsplit("/", 1)[1]
    client = redis.Redis.from_url(serve_run.redis_url)
    assert client.exists(f"fluxstream:file:{name}") == 1
