"""What previews cost and how faithful they are, per decoder, in one run.

- fidelity: PSNR (dB) of each decoder's preview of the final latents against the full VAE
  decode of the same latents, resized to the preview size;
- cost: time of one preview (latents -> small RGB, what the step callback does) over the
  time of one denoising step (the interval between two step-end callbacks: transformer
  plus scheduler);
- end to end: a streamed request through a real server (`python -m stream`, in a process
  of its own) with the OpenAI SDK,
  `partial_images=3` over the same request with `partial_images=0`;
- convergence: through the same server, a preview at every step of a --convergence-steps
  request at the model's default size, per decoder: PSNR of each against the final image.

Times are the best of --repeats runs (after a warm-up): the machines here are shared, and
the fastest run is the one least disturbed by other work. The end-to-end ratio is the
median over interleaved pairs of requests.

    .venv/bin/python -m bench.previews [--model embedded] [--sizes 512 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import FluxPipeline
from openai import OpenAI
from PIL import Image

from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from pipeline.previews import AutoencoderPreviewDecoder, PreviewDecoder
from pipeline.runner import FluxRunner
from stream.params import preview_size
from tests.conftest import sdk_client
from tests.images import decode_b64, psnr
from tests.servers import server_process

GENERIC_PROMPT = "a lighthouse at dusk"


def timed_s(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def best_s(action: Callable[[], object], repeats: int) -> float:
    action()
    return min(timed_s(action) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tiny-vae", type=Path, default=None, help="TAEF1 folder, optional")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preview-max-side", type=int, default=512)
    parser.add_argument("--convergence-steps", type=int, default=24)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-bench-"))
    spec = ModelSpec(model=args.model, cache_dir=scratch / "cache", tiny_vae=args.tiny_vae)
    runner = create_flux_runner(spec)
    pipe = runner.pipe
    # A prompt the model draws well (the embedded model knows only its scene world), read
    # with the model's own T5 length, as the server does.
    args.prompt = next(iter(runner.profile.example_prompts), GENERIC_PROMPT)
    args.max_sequence_length = runner.profile.max_sequence_length or 512
    decoders: dict[str, PreviewDecoder] = {
        **runner.decoders,
        "vae, downscaled latent": AutoencoderPreviewDecoder(
            pipe.vae, pipe.vae_scale_factor, reduce_latents=True
        ),
    }
    print(f"model={args.model} steps={args.steps} device={pipe.device} dtype={pipe.dtype}")
    for side in args.sizes:
        report_size(pipe, decoders, side, args)
    report_end_to_end(runner, scratch, args)


def report_size(
    pipe: FluxPipeline, decoders: dict[str, PreviewDecoder], side: int, args: argparse.Namespace
) -> None:
    step_ends: list[float] = []

    def mark(*_: object) -> dict[str, object]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        return {}

    def generate() -> torch.Tensor:
        step_ends.clear()
        packed = pipe(
            prompt=args.prompt,
            width=side,
            height=side,
            num_inference_steps=args.steps,
            max_sequence_length=args.max_sequence_length,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=mark,
        ).images
        return packed

    step_s = float("inf")
    for _ in range(args.repeats):
        packed = generate()
        intervals = [later - earlier for earlier, later in pairwise(step_ends)]
        step_s = min(step_s, statistics.median(intervals))
    latents = pipe._unpack_latents(packed, side, side, pipe.vae_scale_factor)[0]
    size = preview_size((side, side), args.preview_max_side)
    full = AutoencoderPreviewDecoder(pipe.vae, pipe.vae_scale_factor)
    reference = full.decode(latents, (side, side)).resize(size, Image.Resampling.BILINEAR)
    print(f"\n{side}x{side}, preview {size[0]}x{size[1]}: one step {step_s * 1000:.1f} ms")
    print(f"  {'decoder':<24} {'PSNR vs VAE':>11} {'ms/preview':>11} {'preview/step':>13}")
    for name, decoder in decoders.items():
        fidelity = psnr(decoder.decode(latents, size), reference)
        cost_s = best_s(partial(decoder.decode, latents, size), args.repeats)
        print(f"  {name:<24} {fidelity:>9.1f}dB {cost_s * 1000:>11.2f} {cost_s / step_s:>12.1%}")


def report_end_to_end(runner: FluxRunner, scratch: Path, args: argparse.Namespace) -> None:
    """Through `python -m stream` in a process of its own, as deployed."""
    flags = ["--model", args.model, "--max-partial-images", str(args.convergence_steps - 1)]
    flags += ["--preview-max-side", str(args.preview_max_side)]
    if args.tiny_vae is not None:
        flags += ["--preview-tiny-vae", str(args.tiny_vae)]
    with server_process(scratch / "cache", scratch / "images", *flags) as (_, url):
        client = sdk_client(url)
        for side in args.sizes:
            report_streamed(client, side, args)
        report_convergence(client, runner.profile.preview_decoders, args)


def report_convergence(client: OpenAI, decoders: tuple[str, ...], args: argparse.Namespace) -> None:
    """PSNR of the preview at each step against the final image, per decoder."""
    table: dict[str, list[float]] = {}
    for decoder in decoders:
        events = list(
            client.images.generate(
                prompt=args.prompt,
                stream=True,
                partial_images=args.convergence_steps - 1,
                extra_body={
                    "num_inference_steps": args.convergence_steps,
                    "seed": 0,
                    "preview": decoder,
                },
            )
        )
        final = decode_b64(events[-1].b64_json)
        table[decoder] = [
            psnr(decode_b64(e.b64_json).resize(final.size), final) for e in events[:-1]
        ]
    print(f"\nconvergence, default size, {args.convergence_steps} steps: PSNR (dB) vs final")
    print("  step " + "".join(f"{name:>9}" for name in table))
    for step in range(args.convergence_steps - 1):
        print(f"  {step + 1:>4} " + "".join(f"{table[name][step]:>9.1f}" for name in table))


def report_streamed(client: OpenAI, side: int, args: argparse.Namespace) -> None:
    def streamed(partials: int) -> None:
        events = list(
            client.images.generate(
                prompt=args.prompt,
                size=f"{side}x{side}",
                stream=True,
                partial_images=partials,
                extra_body={"num_inference_steps": args.steps, "seed": 0, "preview": "linear"},
            )
        )
        assert len(events) == partials + 1

    # Interleaved pairs, so that drifting load on a shared machine hits both alike; the
    # median of the pairs' ratios is the figure least moved by one disturbed run.
    times: dict[int, list[float]] = {3: [], 0: []}
    streamed(3)
    streamed(0)
    for _ in range(args.repeats):
        for partials, runs in times.items():
            runs.append(timed_s(partial(streamed, partials)))
    ratios = [with_s / without_s for with_s, without_s in zip(times[3], times[0], strict=True)]
    print(f"\nstreamed {side}x{side}, {args.steps} steps, linear previews:")
    print(
        f"  best of {args.repeats}: partial_images=3 {min(times[3]) * 1000:.1f} ms, "
        f"partial_images=0 {min(times[0]) * 1000:.1f} ms"
    )
    print(f"  ratio 3 previews / 0 previews, median of pairs: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
