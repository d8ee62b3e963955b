"""What streaming through the server costs over a bare diffusers call, in one run.

Times (a) `pipe(...)` on the loaded pipeline directly and (b) the same request through a
real server (`python -m stream`, in a process of its own, as deployed: a server thread in
this process would compete with the client for the GIL and inflate the ratio) with the
OpenAI SDK, `stream=True, partial_images=3`, and prints the ratio (b)/(a): the median
over --repeats interleaved pairs, after a warm-up of each. Then each stage of the last
mile for one image of the same size (`bench.encode`): what the ratio is made of.

    .venv/bin/python -m bench.stream_overhead [--model embedded] [--size 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.encode import generated_like, last_mile_table
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from tests.conftest import sdk_client
from tests.servers import server_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--size", type=int, default=256, help="the embedded model's own")
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

    folders = (scratch / "cache", scratch / "images")
    with server_process(*folders, "--model", args.model) as (_, url):
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
        # Interleaved pairs: a shared machine's load drifts over a run, and two separate
        # series of one kind each would measure the drift as much as the streaming.
        pairs = [(bare(), streamed()) for _ in range(args.repeats)]
    bare_s = statistics.median(b for b, _ in pairs)
    streamed_s = statistics.median(s for _, s in pairs)
    print(f"model={args.model} size={args.size} steps={args.steps} device={pipe.device}")
    print(f"bare diffusers call:           {bare_s * 1000:8.1f} ms")
    print(f"streamed, partial_images=3:    {streamed_s * 1000:8.1f} ms")
    print(f"ratio streamed / bare:         {statistics.median(s / b for b, s in pairs):8.3f}")
    print("\nthe last mile of the completed image (PNG, b64_json):")
    last_mile_table(generated_like(args.size), args.size, args.repeats)


if __name__ == "__main__":
    main()
