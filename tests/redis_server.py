"""A private Redis server for the shared-state tests, skipped with a reason where missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def redis_server() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server)")
    pytest.importorskip("redis", reason="the redis package comes with the cluster extra")
    from stream.local_redis import local_redis_server

    # Unsupervised: the outage tests stop it, and a restart would end their outage.
    with local_redis_server(supervised=False) as url:
        yield url
