"""What engine batching gains in throughput and costs in latency, measured through the engine.

N requests of one shape (different prompts and seeds) arrive at once at a `ThreadedEngine`
on the real pipeline; for each `max_batch_size` the engine serves the burst, and the
bench notes the wall time (throughput) and each request's latency from submit to result.
Configurations take turns over `--repeats` bursts and keep their fastest burst, so that a
busy machine slows them alike. Also times one request alone per configuration: with
nothing queued it runs by itself, so batching must cost it nothing.

    .venv/bin/python -m bench.batching [--model embedded] [--size 128] [--steps 8]
        [--requests 8] [--batches 1 2 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.jobs import Job, Preview
from pipeline.loading import ModelSpec
from pipeline.runner import FluxRunner

PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "a city at night", "a bowl of fruit")


@dataclasses.dataclass(frozen=True)
class Burst:
    wall_s: float
    latencies_s: tuple[float, ...]
    first_previews_s: tuple[float, ...]


async def serve(engine: ThreadedEngine, jobs: list[Job]) -> Burst:
    """Submit `jobs` at once and wait for every result."""
    started = time.perf_counter()

    async def one(job: Job) -> tuple[float, float]:
        first_preview = float("nan")
        async for event in engine.submit(job).events():
            if isinstance(event, Preview) and event.index == 0:
                first_preview = time.perf_counter() - started
        return time.perf_counter() - started, first_preview

    timings = await asyncio.gather(*(one(job) for job in jobs))
    return Burst(
        wall_s=time.perf_counter() - started,
        latencies_s=tuple(latency for latency, _ in timings),
        first_previews_s=tuple(preview for _, preview in timings),
    )


async def measure(
    runner: FluxRunner, jobs: list[Job], batches: list[int], repeats: int
) -> tuple[dict[int, Burst], dict[int, float]]:
    engines = {b: ThreadedEngine(runner, max_queued=len(jobs), max_batch_size=b) for b in batches}
    best: dict[int, Burst] = {}
    alone: dict[int, float] = {}
    for engine in engines.values():  # warm-up: the first burst of each size pays allocations
        await serve(engine, jobs)
    for _ in range(repeats):
        for b, engine in engines.items():
            burst = await serve(engine, jobs)
            if b not in best or burst.wall_s < best[b].wall_s:
                best[b] = burst
            single = (await serve(engine, jobs[:1])).wall_s
            alone[b] = min(alone.get(b, single), single)
    for engine in engines.values():
        await engine.aclose()
    return best, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-bench-"))
    runner = create_flux_runner(ModelSpec(model=args.model, cache_dir=scratch / "cache"))
    profile = runner.profile
    jobs = [
        Job(
            prompt=PROMPTS[i % len(PROMPTS)],
            width=args.size,
            height=args.size,
            seeds=(i,),
            num_inference_steps=args.steps,
            guidance_scale=profile.default_guidance,
            partial_images=1,
        )
        for i in range(args.requests)
    ]
    best, alone = asyncio.run(measure(runner, jobs, args.batches, args.repeats))

    base = best[args.batches[0]]
    base_mean = statistics.mean(base.latencies_s)
    print(
        f"{args.model}, {args.size}², {args.steps} steps, {args.requests} requests at once; "
        f"fastest of {args.repeats} bursts; ratios against max_batch_size={args.batches[0]}"
    )
    print(
        "batch  wall     images/s  gain   latency min / mean / max    mean ratio  "
        "first preview mean  alone"
    )
    for b in args.batches:
        burst = best[b]
        mean = statistics.mean(burst.latencies_s)
        print(
            f"{b:<6} {burst.wall_s:6.2f} s {args.requests / burst.wall_s:8.2f}  "
            f"{base.wall_s / burst.wall_s:4.2f}x  "
            f"{min(burst.latencies_s):5.2f} / {mean:5.2f} / "
            f"{max(burst.latencies_s):5.2f} s   {mean / base_mean:8.2f}x  "
            f"{statistics.mean(burst.first_previews_s):14.2f} s   {alone[b]:5.2f} s"
        )


if __name__ == "__main__":
    main()
