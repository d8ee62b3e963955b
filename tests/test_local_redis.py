"""serve-cluster's private redis-server: restarted with its data when it dies, and said so."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from typing import TYPE_CHECKING

import pytest

from stream.local_redis import local_redis_server

if TYPE_CHECKING:
    from redis import Redis

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)
redis = pytest.importorskip("redis", reason="the redis package comes with the cluster extra")


def server_pid(client: Redis) -> int | None:
    """The pid of the server that serves now, None while none does (INFO answers while a
    restarted server still loads its data; PING does not)."""
    try:
        client.ping()
        return int(client.info("server")["process_id"])
    except redis.exceptions.RedisError:
        return None


def test_a_killed_private_redis_server_comes_back_on_its_port_with_its_data(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stream.local_redis")
    with local_redis_server() as url:
        client = redis.Redis.from_url(url)
        client.set("fluxstream:job:kept", "written before the crash")
        first = server_pid(client)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server_pid(client) in (None, first):
            assert time.monotonic() < deadline, "the redis-server was not restarted"
            time.sleep(0.05)
        assert client.get("fluxstream:job:kept") == b"written before the crash"
        client.close()
    port = url.split(":")[2].split("/")[0]
    said = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert said[0][0] == "ERROR"
    assert said[0][1].startswith(f"the private redis-server on port {port} exited (code -9)")
    assert said[1][0] == "WARNING"
    assert said[1][1].startswith(f"the private redis-server on port {port} is back (pid ")
    assert len(said) == 2  # and stopping it at the end is not taken for a crash


def test_leaving_stops_the_private_redis_server_without_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="stream.local_redis")
    with local_redis_server() as url:
        client = redis.Redis.from_url(url)
        pid = server_pid(client)
        client.close()
    assert pid is not None
    time.sleep(0.5)
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(url).ping()
    assert caplog.records == []
