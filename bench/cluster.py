"""Throughput with one and two Ray Serve replicas, and the proxy's added time to first byte.

In one run: a plain `python -m stream` server, then `python -m stream.cluster` with 1 and
with 2 replicas, all on the embedded model and this machine. Each gets --requests plain
requests from --clients concurrent clients; prints requests per minute, the ratio of two
replicas to one, and the median time to the first byte of a stream through the proxy
against the plain server.

    .venv/bin/python -m bench.cluster [--requests 24] [--clients 4] [--size 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.servers import free_port, wait_healthy


@contextmanager
def server(module: str, scratch: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        module,
        "--port",
        str(port),
        "--cache-dir",
        str(scratch / "cache"),
        "--data-dir",
        str(scratch / "images"),
        "--no-warmup",
        "--log-level",
        "warning",
        *extra,
    ]
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout_s=240)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def requests_per_minute(url: str, args: argparse.Namespace) -> float:
    body = {
        "prompt": "a lighthouse",
        "size": f"{args.size}x{args.size}",
        "num_inference_steps": args.steps,
        "response_format": "b64_json",
    }

    def one(_: int) -> None:
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=300)
        response.raise_for_status()

    one(0)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(args.requests)))
    return args.requests / (time.perf_counter() - started) * 60


def time_to_first_byte(url: str, args: argparse.Namespace) -> float:
    body = {
        "prompt": "a lighthouse",
        "size": f"{args.size}x{args.size}",
        "stream": True,
        "partial_images": 1,
        "num_inference_steps": args.steps,
    }
    samples = []
    for _ in range(args.samples):
        started = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=300) as r:
            chunks = r.iter_bytes()
            next(chunks)
            samples.append(time.perf_counter() - started)
            for _ in chunks:
                pass
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-cluster-bench-"))
    with server("stream", scratch) as url:
        plain_ttfb = time_to_first_byte(url, args)
        plain_rpm = requests_per_minute(url, args)
    results = {}
    for replicas in (1, 2):
        with server("stream.cluster", scratch, "--replicas", str(replicas)) as url:
            results[replicas] = (requests_per_minute(url, args), time_to_first_byte(url, args))
    print(
        f"embedded model, {args.size}², {args.steps} steps, {args.requests} requests from "
        f"{args.clients} clients, {os.cpu_count()} CPUs"
    )
    row = "{:<21} {:7.1f} requests/min, first byte {:6.1f} ms"
    print(row.format("plain server:", plain_rpm, plain_ttfb * 1000))
    for replicas, (rpm, ttfb) in results.items():
        print(row.format(f"cluster, {replicas} replica(s):", rpm, ttfb * 1000))
    print(f"2 replicas / 1 replica throughput: {results[2][0] / results[1][0]:.2f}x")
    print(
        f"proxy's first byte / plain server's: {results[1][1] / plain_ttfb:.2f}x "
        f"(+{(results[1][1] - plain_ttfb) * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
