"""What streaming through the server costs over a bare diffusers call, in one run.

Times (a) `pipe(...)` on the loaded pipeline directly and (b) the same request through a
real uvicorn server with the OpenAI SDK, `stream=True, partial_images=3`, and prints the
ratio (b)/(a). Medians over --repeats runs after a warm-up of each.

    .venv/bin/python -m bench.stream_overhead [--model embedded] [--size 512] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from stream.app import create_app
from stream.settings import Settings
from tests.conftest import sdk_client
from tests.servers import live_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-bench-"))
    runner = create_flux_runner(ModelSpec(model=args.model, cache_dir=scratch / "cache"))
    pipe = runner.pipe
    # The server passes the model's T5 length (32 on the embedded model); so does the bare call.
    t5_length = runner.profile.max_sequence_length or 512

    def bare() -> float:
        started = time.perf_counter()
        pipe(
            prompt="a lighthouse at dusk",
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            max_sequence_length=t5_length,
            generator=torch.Generator().manual_seed(0),
        )
        return time.perf_counter() - started

    settings = Settings(data_dir=scratch / "images", cache_dir=scratch / "cache")
    app = create_app(settings, ThreadedEngine(runner, max_queued=4))
    with live_server(app) as url:
        client = sdk_client(url)

        def streamed() -> float:
            started = time.perf_counter()
            events = list(
                client.images.generate(
                    prompt="a lighthouse at dusk",
                    size=f"{args.size}x{args.size}",
                    stream=True,
                    partial_images=3,
                    extra_body={"num_inference_steps": args.steps, "seed": 0},
                )
            )
            assert events[-1].type == "image_generation.completed"
            return time.perf_counter() - started

        bare(), streamed()
        bare_s = statistics.median(bare() for _ in range(args.repeats))
        streamed_s = statistics.median(streamed() for _ in range(args.repeats))
    print(f"model={args.model} size={args.size} steps={args.steps} device={pipe.device}")
    print(f"bare diffusers call:           {bare_s * 1000:8.1f} ms")
    print(f"streamed, partial_images=3:    {streamed_s * 1000:8.1f} ms")
    print(f"ratio streamed / bare:         {streamed_s / bare_s:8.3f}")


if __name__ == "__main__":
    main()
