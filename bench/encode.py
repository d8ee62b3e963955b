"""What each output format and encoder costs, and the rest of the last mile, in one run.

For each size, a picture that looks like generated output to an encoder (a scene from the
embedded model's world under a smooth gradient of light, with mild grain: flat areas,
soft edges and texture, not noise) is encoded by every candidate that is installed, for
every output format the server writes. Each row gives the time, the file size against
Pillow's at the settings the server used before fpng, and for PNG whether the file reads
back pixel-identical (for the lossy formats, PSNR against the original instead). Lossy
candidates run at the server's default quality.

Then the steps after the encode, on the server's PNG: base64, the JSON body of a
`b64_json` answer, the SSE `completed` frame and the url store's write; and `n=4` images
encoded one after another against `stream.images.encode_all` (in parallel threads).

Times are the best of --repeats runs after a warm-up: the machines here are shared, and
the fastest run is the one least disturbed by other work.

    .venv/bin/python -m bench.encode [--sizes 512 1024] [--repeats 7]

Candidates from packages that are not installed are listed as such; the optional ones
are `pip install imagecodecs simplejpeg`.
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from importlib import import_module
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from PIL import Image
from starlette.responses import JSONResponse

from pipeline.embedded.scenes import random_scene, render
from pipeline.pixels import to_pil_images
from stream import sse
from stream.images import DEFAULT_QUALITY, encode_all, encode_image, to_b64
from stream.store import DiskResultStore

Encode = Callable[[np.ndarray, Image.Image], bytes]


@dataclass(frozen=True)
class Candidate:
    output_format: str
    name: str
    module: str | None  # the optional package it needs, None for Pillow and the server
    encode: Encode


def generated_like(size: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB (size, size, 3): a rendered scene, lit by a smooth gradient, with grain."""
    scene = render(random_scene(random.Random(seed), objects=2), size, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = 0.8 + 0.2 * np.cos(2.2 * x + 1.3 * y)[..., None]
    grain = np.random.default_rng(seed).normal(0.0, 0.012, scene.shape).astype(np.float32)
    return (np.clip(scene * light + grain, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def pillow(image_format: str, **options: Any) -> Encode:
    def encode(pixels: np.ndarray, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **options)
        return buffer.getvalue()

    return encode


def server(output_format: str) -> Encode:
    return lambda pixels, image: encode_image(image, output_format, DEFAULT_QUALITY)


def pillow_gif(method: Image.Quantize) -> Encode:
    def encode(pixels: np.ndarray, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.quantize(colors=256, method=method).save(buffer, format="GIF")
        return buffer.getvalue()

    return encode


def packaged(
    output_format: str, name: str, module: str, call: Callable[[Any, np.ndarray], bytes]
) -> Candidate:
    """A candidate from an optional package: `call(package, pixels)`, imported when it runs."""
    return Candidate(
        output_format, name, module, lambda pixels, image: call(import_module(module), pixels)
    )


def candidates() -> list[Candidate]:
    """Per format, the first row is the baseline (Pillow as the server used it before)."""
    q = DEFAULT_QUALITY
    return [
        Candidate("png", "Pillow, level 6 (default)", None, pillow("PNG")),
        Candidate("png", "Pillow, level 1", None, pillow("PNG", compress_level=1)),
        packaged("png", "imagecodecs (zlib-ng), level 1", "imagecodecs",
                 lambda m, p: m.png_encode(p, level=1)),
        packaged("png", "imagecodecs (zlib-ng), level 6", "imagecodecs",
                 lambda m, p: m.png_encode(p, level=6)),
        packaged("png", "fpng", "fpng", lambda m, p: m.from_ndarray(p)),
        Candidate("png", "server (stream.png: fpng, else Pillow)", None, server("png")),
        Candidate("jpeg", f"Pillow q{q} (server)", None, server("jpeg")),
        packaged("jpeg", f"simplejpeg q{q} 4:2:0", "simplejpeg",
                 lambda m, p: m.encode_jpeg(p, quality=q, colorsubsampling="420")),
        packaged("jpeg", f"imagecodecs (libjpeg-turbo) q{q}", "imagecodecs",
                 lambda m, p: m.jpeg8_encode(p, level=q)),
        Candidate("webp", f"Pillow q{q} method 4", None, pillow("WEBP", quality=q, method=4)),
        Candidate("webp", f"Pillow q{q} method 0 (server)", None, server("webp")),
        Candidate("webp", f"Pillow q{q} method 6", None, pillow("WEBP", quality=q, method=6)),
        packaged("webp", f"imagecodecs q{q} method 0", "imagecodecs",
                 lambda m, p: m.webp_encode(p, level=q, lossless=False, method=0)),
        Candidate("avif", f"Pillow q{q} speed 6", None, pillow("AVIF", quality=q, speed=6)),
        Candidate("avif", f"Pillow q{q} speed 8", None, pillow("AVIF", quality=q, speed=8)),
        Candidate("avif", f"Pillow q{q} speed 10 (server)", None, server("avif")),
        packaged("avif", f"imagecodecs q{q} speed 8", "imagecodecs",
                 lambda m, p: m.avif_encode(p, level=q, speed=8)),
        Candidate("gif", "Pillow median cut (server)", None, server("gif")),
        Candidate("gif", "Pillow fast octree", None, pillow_gif(Image.Quantize.FASTOCTREE)),
    ]  # fmt: skip


def best_of(repeats: int, run: Callable[[], object]) -> tuple[float, Any]:
    """Best time in ms over `repeats` runs after one warm-up, and the last result."""
    result = run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times) * 1000, result


def installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        import_module(module)
    except ImportError:
        return False
    return True


def fidelity(pixels: np.ndarray, data: bytes, output_format: str) -> str:
    """PNG: whether the file reads back pixel-identical; lossy formats: PSNR in dB."""
    with Image.open(io.BytesIO(data)) as opened:
        back = np.asarray(opened.convert("RGB"), dtype=np.float64)
    if output_format == "png":
        return "identical" if np.array_equal(back, pixels) else "DIFFERENT"
    mse = float(np.mean((back - pixels) ** 2))
    return "exact" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f} dB"


def encoder_table(pixels: np.ndarray, size: int, repeats: int) -> None:
    image = Image.fromarray(pixels)
    baseline: dict[str, int] = {}
    for candidate in candidates():
        label = f"| {size}² | {candidate.output_format} | {candidate.name} |"
        if not installed(candidate.module):
            print(f"{label} not installed | | | |")
            continue
        ms, data = best_of(repeats, partial(candidate.encode, pixels, image))
        baseline.setdefault(candidate.output_format, len(data))
        ratio = len(data) / baseline[candidate.output_format]
        quality = fidelity(pixels, data, candidate.output_format)
        print(f"{label} {ms:.1f} | {len(data) / 1024:.0f} KB | {ratio:.2f}x | {quality} |")


async def best_of_async(repeats: int, run: Callable[[], Awaitable[object]]) -> float:
    """`best_of` for a coroutine, timed inside one event loop."""
    await run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await run()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def last_mile_table(pixels: np.ndarray, size: int, repeats: int) -> None:
    decoded = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    quantise_ms, (image,) = best_of(repeats, lambda: to_pil_images(decoded))
    encode_ms, data = best_of(repeats, lambda: encode_image(image, "png"))
    b64_ms, b64 = best_of(repeats, lambda: to_b64(data))
    item = {"b64_json": b64, "revised_prompt": "a lighthouse at dusk", "seed": 0}
    body = {"created": 0, "data": [item], "output_format": "png", "size": f"{size}x{size}"}
    json_ms, _ = best_of(repeats, lambda: JSONResponse(body).body)
    completed = {"type": "image_generation.completed", **item, "output_format": "png"}
    sse_ms, _ = best_of(repeats, lambda: sse.event_frame(completed))
    with tempfile.TemporaryDirectory(prefix="fluxstream-encode-") as folder:
        store = DiskResultStore(Path(folder), ttl_s=60)
        store_ms = anyio.run(best_of_async, repeats, lambda: store.put(data, "png"))
    for stage, ms in [
        ("decoded float image to uint8 PIL (`pipeline.pixels`)", quantise_ms),
        ("encode PNG (server)", encode_ms),
        ("base64", b64_ms),
        ("JSON body of a `b64_json` answer (JSONResponse)", json_ms),
        ("SSE completed frame (JSON + frame)", sse_ms),
        ("url store write (with its thread hop)", store_ms),
        (
            "decoded to SSE frame (quantise + encode + base64 + frame)",
            quantise_ms + encode_ms + b64_ms + sse_ms,
        ),
    ]:
        print(f"| {size}² | {stage} | {ms:.1f} |")


def parallel_table(pixels: np.ndarray, size: int, repeats: int, n: int) -> None:
    """`n` different images of one request: one after another, then `encode_all`."""
    images = [Image.fromarray(np.roll(pixels, 7 * i, axis=1)) for i in range(n)]
    for output_format in ("png", "jpeg"):

        def serial(output_format: str = output_format) -> list[bytes]:
            return [encode_image(image, output_format) for image in images]

        async def parallel(output_format: str = output_format) -> list[bytes]:
            return await encode_all(images, (size, size), output_format, None)

        serial_ms, _ = best_of(repeats, serial)
        parallel_ms = anyio.run(best_of_async, repeats, parallel)
        print(f"| {size}² | {n} x {output_format}: one after another | {serial_ms:.1f} |")
        print(f"| {size}² | {n} x {output_format}: `encode_all` (threads) | {parallel_ms:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n", type=int, default=4, help="images for the parallel encode")
    args = parser.parse_args()
    pictures = {size: generated_like(size) for size in args.sizes}

    print("| image | format | encoder | ms | size | x baseline | read back |")
    print("|---|---|---|---|---|---|---|")
    for size, pixels in pictures.items():
        encoder_table(pixels, size, args.repeats)
    print()
    print("| image | stage | ms |")
    print("|---|---|---|")
    for size, pixels in pictures.items():
        last_mile_table(pixels, size, args.repeats)
    for size, pixels in pictures.items():
        parallel_table(pixels, size, args.repeats, args.n)


if __name__ == "__main__":
    main()
