"""What `acceleration` buys: time per image and distance from the uncached image, per level.

Runs the same seeded job through the real runner at each level (`none`, `regular`, `high`)
and prints the median time, the speed-up over `none`, how many transformer passes ran in
full, and the mean absolute pixel difference (0-255) from the `none` image. Medians over
--repeats runs after one warm-up each.

    .venv/bin/python -m bench.acceleration [--model embedded] [--size 256] [--steps 28]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import get_args

import numpy as np
from PIL import Image

from pipeline.acceleration import plan_speedup
from pipeline.factory import create_flux_runner
from pipeline.jobs import Acceleration, Event, Job, Result
from pipeline.loading import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-bench-"))
    runner = create_flux_runner(ModelSpec(model=args.model, cache_dir=scratch / "cache"))
    transformer = runner.pipe.transformer
    full_passes = [0]

    def count(*_: object) -> None:
        full_passes[0] += 1

    # The attention of the last block runs only when the cache computes the model in full
    # (a skipped block's own forward hook would still fire, its attention does not).
    tail = (transformer.single_transformer_blocks or transformer.transformer_blocks)[-1]
    tail.attn.register_forward_hook(count)

    def job(level: Acceleration) -> Job:
        return Job(
            prompt=next(iter(runner.profile.example_prompts), "a lighthouse at dusk"),
            width=args.size,
            height=args.size,
            seeds=(0,),
            num_inference_steps=args.steps,
            guidance_scale=runner.profile.default_guidance,
            acceleration=level,
        )

    def run(level: Acceleration) -> tuple[float, Image.Image, int]:
        full_passes[0] = 0

        def ignore(event: Event) -> None:
            return None

        started = time.perf_counter()
        result: Result = runner.run(job(level), ignore, lambda: False)
        return time.perf_counter() - started, result.images[0], full_passes[0]

    print(f"model={args.model} size={args.size} steps={args.steps} device={runner.pipe.device}")
    print(f"{'level':<9} {'threshold':>9} {'median':>10} {'speed-up':>9} {'full':>6} {'diff':>7}")
    levels: tuple[Acceleration, ...] = get_args(Acceleration)
    for level in levels:
        run(level)
    # Interleaved, so that load from other processes falls on every level alike.
    runs = [[run(level) for level in levels] for _ in range(args.repeats)]
    baseline_s = statistics.median(r[0][0] for r in runs)
    baseline = np.asarray(runs[0][0][1], dtype=np.float64)
    for column, level in enumerate(levels):
        seconds = statistics.median(r[column][0] for r in runs)
        _, image, passes = runs[0][column]
        difference = np.abs(np.asarray(image, dtype=np.float64) - baseline).mean()
        threshold = plan_speedup(job(level), runner.thresholds).threshold or 0.0
        print(
            f"{level:<9} {threshold:>9} {seconds * 1000:>8.1f}ms {baseline_s / seconds:>8.2f}x "
            f"{passes:>3}/{args.steps:<2} {difference:>7.2f}"
        )


if __name__ == "__main__":
    main()
