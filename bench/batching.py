"""Would batching compatible queued requests pay off? Measured on the pipeline itself.

For k requests of the same size and steps with different prompts, times (a) k pipeline
calls one after another, as the engine runs them today, and (b) one call with the k
prompts and k generators. Prints the throughput gain (a)/(b) and the latency cost: with
(b) every request waits for the whole batch, with (a) request i waits for i images.

    .venv/bin/python -m bench.batching [--model embedded] [--size 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec

PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "a city at night", "a bowl of fruit")


def fastest_seconds(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """The fastest of `repeats` runs of each call, the calls interleaved so that a busy
    machine slows them alike; the minimum is the least noisy estimate on shared cores."""
    for call in calls:
        call()  # warm-up
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            started = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-bench-"))
    pipe = create_flux_runner(ModelSpec(model=args.model, cache_dir=scratch / "cache")).pipe

    def generate(prompts: list[str] | tuple[str, ...]) -> object:
        return pipe(
            prompt=list(prompts),
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
        )

    print(f"{args.model}, {args.size}², {args.steps} steps; fastest of {args.repeats} runs")
    print("k   one by one   batched   throughput gain   mean latency (one by one → batched)")
    for k in args.batches:  # k = 1 times the same call twice: its "gain" is the noise
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(k)]
        single, batched = fastest_seconds(
            [lambda: generate(PROMPTS[:1]), lambda p=prompts: generate(p)], args.repeats
        )
        sequential = k * single
        mean_sequential = single * (k + 1) / 2  # request i finishes after i images
        print(
            f"{k:<3} {sequential * 1000:8.0f} ms {batched * 1000:7.0f} ms "
            f"{sequential / batched:14.2f}x   {mean_sequential * 1000:6.0f} ms → "
            f"{batched * 1000:.0f} ms ({batched / mean_sequential:.2f}x)"
        )


if __name__ == "__main__":
    main()
