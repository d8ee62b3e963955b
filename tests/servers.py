"""Real servers on free loopback ports, in threads: the app as SDK clients see it, and a
receiver that plays a webhook endpoint."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp


def free_port() -> int:
    """A loopback port that was free a moment ago, for a server started in a subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(base_url: str, process: subprocess.Popen[Any], timeout_s: float) -> None:
    """Wait until the server process answers 200 on /health; fail at once if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not become healthy (exit code {process.poll()})")


@contextmanager
def server_process(
    cache_dir: Path, data_dir: Path, *flags: str, timeout_s: float = 600
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m stream` with `flags` in a process of its own, on a free loopback port: the
    process (to signal) and its base URL, once healthy. What benchmarks time (a server
    thread in the client's process competes with it for the GIL) and what shutdown tests
    signal. On exit a server still running is stopped: SIGTERM, then SIGKILL after 60 s."""
    port = free_port()
    command = [sys.executable, "-m", "stream", "--port", str(port)]
    command += ["--cache-dir", str(cache_dir), "--data-dir", str(data_dir)]
    process = subprocess.Popen([*command, *flags])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout_s=timeout_s)
        yield process, url
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], kill: Callable[[], None] | None = None) -> None:
    """Stop a server still running as an operator would: SIGTERM, then after 60 s `kill`
    (default: SIGKILL to the process)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        (kill or process.kill)()
        process.wait(timeout=30)


@contextmanager
def live_server(app: ASGIApp) -> Iterator[str]:
    """Serve `app` on 127.0.0.1:<free port> and yield its base URL; stop it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@contextmanager
def webhook_receiver(statuses: Sequence[int]) -> Iterator[tuple[str, list[Delivery]]]:
    """Yield a URL on 127.0.0.1 and the requests POSTed to it; the i-th call is answered
    with `statuses[i]` (the last one repeats)."""
    deliveries: list[Delivery] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(statuses[min(len(deliveries), len(statuses)) - 1])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", deliveries
    finally:
        server.shutdown()
        server.server_close()
