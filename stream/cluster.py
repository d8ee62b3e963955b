"""`make serve-cluster`: the same app as Ray Serve replicas behind one HTTP endpoint.

Each replica builds its own engine and the unchanged Starlette app (`create_app`), late, in
the replica process, so nothing heavy is pickled. Ray's proxy routes requests; a replica
takes at most as many requests as its engine admits (`max_ongoing_requests` = the running
job + `max_queued`), so the router spreads load before any replica has to answer 429, and
Ray's own bounded queue (`max_queued_requests`) answers 503 beyond that, which the SDKs
retry. State that any replica must see (url results) lives in a shared store: the same
`data_dir` on one machine, or Redis across machines. `build` makes the same application
from a Ray Serve config file (deploy/serve.yaml, for `serve run`, `serve deploy` and
KubeRay).

A replica that dies mid-stream cannot send the `error` frame its clients are owed, so the
proxy runs `stream.proxy_guard`, which ends such streams with one.

Who stops whom: SIGINT or SIGTERM to this process deletes the Serve application, shuts
Serve down (replicas stop, the proxy frees the port) and, if this process started the Ray
head, stops it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

from stream.settings import Settings

logger = logging.getLogger(__name__)
APP_NAME = "fluxstream"
PROXY_CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "stream.proxy_guard.proxy_middlewares"


class RayUnavailable(Exception):
    """Ray Serve is not installed (`pip install -e '.[cluster]'`)."""


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError as error:
        raise RayUnavailable(
            "Ray Serve is not installed; run `make serve-cluster` or pip install -e '.[cluster]'"
        ) from error
    return serve


class FluxstreamReplica:
    """One replica: its own engine on its own device, the unchanged app as ingress."""

    def __init__(self, settings: Settings) -> None:
        replica_id = _serve().get_replica_context().replica_id.unique_id
        name = f"{replica_id}@{socket.gethostname()}:{os.getpid()}"
        self.settings = settings.model_copy(update={"replica_name": name})

    def __serve_build_asgi_app__(self) -> Any:
        from stream.app import create_app
        from stream.cli import build_engine

        return create_app(self.settings, build_engine(self.settings))


def deployment_options(settings: Settings, gpus_per_replica: float) -> dict[str, Any]:
    """Ray Serve options that follow the engine's own admission capacity."""
    capacity = settings.max_queued + 1
    options: dict[str, Any] = {
        "name": APP_NAME,
        "max_ongoing_requests": capacity,
        "max_queued_requests": settings.max_queued * max(settings.replicas, 1),
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": 0},
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 10,
    }
    if settings.autoscale_max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.autoscale_min_replicas,
            "max_replicas": settings.autoscale_max_replicas,
            "target_ongoing_requests": settings.autoscale_target_ongoing,
        }
    else:
        options["num_replicas"] = settings.replicas
    return options


def deploy(settings: Settings) -> None:
    """Start (or join) Ray, then run the app with `settings.replicas` replicas; returns when
    the application is ready."""
    serve = _serve()
    import ray

    # Read by the HTTP proxy that this process's Ray head starts; on a cluster started
    # with `ray start`, set it there (see README, Scaling out).
    os.environ.setdefault(PROXY_CALLBACK_VARIABLE, PROXY_CALLBACK)
    if not ray.is_initialized():
        # "local", not None: Ray's default would join any cluster that `ray start` left
        # on this machine, whose Serve keeps its own port and which Ctrl-C would shut down.
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings), name=APP_NAME, route_prefix="/")


def application(settings: Settings) -> Any:
    """The Serve application: `FluxstreamReplica` as the ingress of one deployment, one GPU
    per replica where the cluster has GPUs. Ray must be initialised."""
    serve = _serve()
    import ray

    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    deployment = serve.deployment(**deployment_options(settings, gpus))(
        serve.ingress()(FluxstreamReplica)
    )
    return deployment.bind(settings)


def build(args: dict[str, Any]) -> Any:
    """The application builder of a Ray Serve config file (`import_path:
    stream.cluster:build`, see deploy/serve.yaml): `args` are settings by field name, over
    `FLUXSTREAM_*` variables and the defaults. The config's `deployments` section then
    overrides Ray's options (replicas, autoscaling, `ray_actor_options`) as usual."""
    return application(Settings(**args))


def shutdown() -> None:
    serve = _serve()
    import ray

    serve.shutdown()
    ray.shutdown()


@contextlib.contextmanager
def shared_state(settings: Settings) -> Iterator[Settings]:
    """Settings whose state every replica shares: the given Redis, or else a private
    `redis-server` for replicas on this machine (url files are shared through `data_dir`),
    restarted whenever it exits, loudly (`stream.local_redis`)."""
    if settings.state_store == "redis":
        yield settings
        return
    from stream.local_redis import local_redis_server

    try:
        with local_redis_server() as url:
            yield settings.model_copy(update={"state_store": "redis", "redis_url": url})
    except FileNotFoundError:
        logger.warning("redis-server is not installed: each replica keeps its own jobs")
        yield settings


def main(argv: list[str] | None = None) -> int:
    from stream.cli import load_settings

    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper())
    with shared_state(settings) as shared:
        try:
            deploy(shared)
        except RayUnavailable as error:
            print(f"fluxstream: {error}", file=sys.stderr)
            return 2
        # After deploy: ray.init installs handlers of its own that would kill us unclean.
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(
            f"fluxstream: {shared.replicas} replicas serving at http://{shared.host}:{shared.port}",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
