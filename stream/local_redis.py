"""A private `redis-server` on a loopback port, kept running while it is in use.

`serve-cluster` starts one when it was given no Redis, so that its replicas on this machine
share jobs (and tests start one each). Replicas keep their job records in it: if it died
unnoticed, every job call would fail until someone restarted the cluster. So a supervisor
thread restarts it on the same port, from the append-only file it wrote into its folder
(Redis writes it before it answers, so a server that is killed keeps every write it
acknowledged), and logs each exit as an error and each restart as a warning. A server
that cannot be started, or dies again at once, is retried with a doubling wait of at most
`MAX_RESTART_DELAY_S`, each attempt logged: shared state is never gone in silence.

Who stops whom: leaving `local_redis_server` tells the supervisor to stop before the
server is terminated, so the supervisor sees that exit as asked for and restarts nothing.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0
MAX_RESTART_DELAY_S = 30.0


@contextmanager
def local_redis_server(*, supervised: bool = True) -> Iterator[str]:
    """A private `redis-server` on a free loopback port; yields its URL.

    Supervised, it is restarted whenever it exits (tests that stop it on purpose, to see
    an outage, turn that off). Raises FileNotFoundError when redis-server is not installed.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="fluxstream-redis-")
    # `appendfsync no`: a killed process loses nothing it wrote; only the machine going
    # down loses what the OS had not flushed yet, and the replicas go down with it.
    command = [
        *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir),
        *("--save", "", "--appendonly", "yes", "--appendfsync", "no"),
    ]
    try:
        server = _Server(command, port, supervised=supervised)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Server:
    def __init__(self, command: list[str], port: int, *, supervised: bool) -> None:
        self.port = port
        self._command = command
        self._stopping = threading.Event()
        # Held while a process is started, so that `stop` never misses a fresh one.
        self._lock = threading.Lock()
        self._process = _start(command, port)
        self._supervisor: threading.Thread | None = None
        if supervised:
            self._supervisor = threading.Thread(
                target=self._supervise, name="fluxstream-redis-supervisor", daemon=True
            )
            self._supervisor.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            process = self._process
        process.terminate()
        process.wait(timeout=10)
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)

    def _supervise(self) -> None:
        delay = 0.0
        while True:
            started = time.monotonic()
            code = self._process.wait()
            if self._stopping.is_set():
                return
            delay = _next_delay(delay, ran_s=time.monotonic() - started)
            logger.error(
                "the private redis-server on port %d exited (code %s): replicas cannot reach "
                "their shared jobs until it is back; restarting it in %.1f s",
                self.port,
                code,
                delay,
            )
            while not self._stopping.wait(delay):
                try:
                    self._restart()
                except (OSError, RuntimeError) as error:
                    delay = _next_delay(delay, ran_s=0.0)
                    logger.error(
                        "the private redis-server on port %d could not be restarted (%s): "
                        "shared jobs are gone until it is; trying again in %.1f s",
                        self.port,
                        error,
                        delay,
                    )
                    continue
                if not self._stopping.is_set():
                    logger.warning(
                        "the private redis-server on port %d is back (pid %d) with the data "
                        "it had written",
                        self.port,
                        self._process.pid,
                    )
                break

    def _restart(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                self._process = _start(self._command, self.port)


def _next_delay(delay: float, *, ran_s: float) -> float:
    """No wait after a server that ran a while; a doubling one for a server that keeps
    dying at once (or cannot start), so that a broken one is not restarted in a busy loop."""
    if ran_s > MAX_RESTART_DELAY_S:
        return 0.0
    return min(max(2 * delay, 0.5), MAX_RESTART_DELAY_S)


def _start(command: list[str], port: int) -> subprocess.Popen[bytes]:
    """Start the server and wait until it serves; RuntimeError if it does not."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _serves(port):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            process.wait()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return process


def _serves(port: int) -> bool:
    """Whether the server answers PING: while it loads its file it accepts connections
    but answers every command with a LOADING error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
