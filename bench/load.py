"""A real server under load: concurrent clients, mixed streaming and plain, some leaving.

Starts `python -m stream` as a subprocess on a free loopback port (or uses --url), measures
each kind of request alone, then sends --requests requests from --clients concurrent
clients: a share stream with previews, and a share of the streams hang up after their
first preview. Prints throughput, p50/p95 latency, time to first preview, 429s, the ratio
of the loaded run's wall time to the sum of the same requests run alone, and the server's
RSS before and after.

    .venv/bin/python -m bench.load [--requests 500] [--clients 8] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.servers import server_process

GENERATIONS = "/v1/images/generations"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    first_previews: list[float] = field(default_factory=list)
    rate_limited: int = 0
    disconnected: int = 0
    failed: int = 0


def kind_of(index: int, stream_share: float, leave_share: float) -> str:
    """Deterministic mix: spread streams and leavers evenly over the request indices."""
    streams = int((index + 1) * stream_share) > int(index * stream_share)
    if not streams:
        return "plain"
    leaves = int((index + 1) * leave_share) > int(index * leave_share)
    return "leave" if leaves else "stream"


async def one_request(
    client: httpx.AsyncClient, body: dict[str, object], kind: str, tally: Tally
) -> float:
    started = time.perf_counter()
    if kind == "plain":
        response = await client.post(GENERATIONS, json=body)
        if response.status_code == 429:
            tally.rate_limited += 1
        elif response.status_code != 200:
            tally.failed += 1
        else:
            tally.latencies.append(time.perf_counter() - started)
        return time.perf_counter() - started
    streamed = {**body, "stream": True, "partial_images": 2}
    async with client.stream("POST", GENERATIONS, json=streamed) as response:
        if response.status_code == 429:
            tally.rate_limited += 1
            return 0.0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["type"].endswith("partial_image") and event["partial_image_index"] == 0:
                tally.first_previews.append(time.perf_counter() - started)
                if kind == "leave":
                    tally.disconnected += 1
                    return time.perf_counter() - started
            elif event["type"].endswith("completed"):
                tally.latencies.append(time.perf_counter() - started)
            elif event["type"] == "error":
                tally.failed += 1
    return time.perf_counter() - started


async def solo_seconds(url: str, body: dict[str, object], repeats: int) -> dict[str, float]:
    """Median time of each kind of request with the server otherwise idle."""
    medians = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for kind in ("plain", "stream", "leave"):
            times = [await one_request(client, body, kind, Tally()) for _ in range(repeats + 1)]
            medians[kind] = statistics.median(times[1:])
    return medians


async def load(
    url: str, body: dict[str, object], args: argparse.Namespace
) -> tuple[Tally, float, list[str]]:
    kinds = [kind_of(i, args.stream_share, args.leave_share) for i in range(args.requests)]
    tally = Tally()
    next_index = iter(range(args.requests))

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for index in next_index:
                await one_request(client, body, kinds[index], tally)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(args.clients)))
    return tally, time.perf_counter() - started, kinds


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measured_server(
    args: argparse.Namespace, stack: ExitStack
) -> tuple[subprocess.Popen[bytes] | None, str]:
    """The server under load: `--url`'s (no process to read RSS from), or one of our own,
    stopped and its scratch folder removed when `stack` closes."""
    if args.url:
        return None, args.url
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fluxstream-load-")))
    flags = ["--model", args.model, "--max-queued", str(args.max_queued), "--log-level", "warning"]
    cache_dir = args.cache_dir or scratch / "cache"
    return stack.enter_context(server_process(cache_dir, scratch / "images", *flags, timeout_s=300))


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--leave-share", type=float, default=0.4, help="of the streams")
    parser.add_argument("--max-queued", type=int, default=16)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--url", default=None, help="an already running server (no RSS)")
    parser.add_argument("--solo-repeats", type=int, default=5)
    args = parser.parse_args()

    body = {"prompt": "a lighthouse at dusk", "size": f"{args.size}x{args.size}",
            "num_inference_steps": args.steps, "response_format": "b64_json"}  # fmt: skip
    with ExitStack() as stack:
        process, url = measured_server(args, stack)
        solo = asyncio.run(solo_seconds(url, body, args.solo_repeats))
        rss_before = rss_mib(process.pid) if process else float("nan")
        tally, wall, kinds = asyncio.run(load(url, body, args))
        rss_after = rss_mib(process.pid) if process else float("nan")

    solo_sum = sum(solo[kind] for kind in kinds)
    done = len(tally.latencies)
    lines = [
        f"requests {args.requests} from {args.clients} clients, {args.size}px, {args.steps} steps",
        f"solo medians: plain {ms(solo['plain'])}, stream {ms(solo['stream'])}, "
        f"leave after the first preview {ms(solo['leave'])}",
        f"completed {done}, disconnected {tally.disconnected}, 429 {tally.rate_limited}, "
        f"failed {tally.failed}",
        f"throughput {done / wall:.2f} images/s over {wall:.1f} s",
        f"latency p50 {ms(percentile(tally.latencies, 0.5))}, "
        f"p95 {ms(percentile(tally.latencies, 0.95))}",
        f"time to first preview p50 {ms(percentile(tally.first_previews, 0.5))}, "
        f"p95 {ms(percentile(tally.first_previews, 0.95))}",
        f"wall / sum of solo runs: {wall / solo_sum:.2f}",
        f"server RSS before {rss_before:.0f} MiB, after {rss_after:.0f} MiB",
    ]
    print("\n".join(lines))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    main()
