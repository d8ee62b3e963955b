"""How well the embedded model follows captions from its grammar, through a real server.

For --count one-object captions drawn at random from the scene grammar (each with its own
seed), the server generates at each --sizes and `pipeline.embedded.judge` checks the
pixels: background, the object's colour, its position, and (for circles, squares and
triangles) its shape. With --sheet it also writes the README's contact sheet: example
prompts and what the model drew for them.

    .venv/bin/python -m bench.prompt_following [--count 200] [--sizes 256 512]
        [--sheet docs/contact-sheet.png]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.embedded import scenes
from pipeline.embedded.judge import judge, rates
from pipeline.engine import ThreadedEngine
from pipeline.factory import create_flux_runner
from pipeline.loading import ModelSpec
from stream.app import create_app
from stream.settings import Settings
from tests.conftest import sdk_client
from tests.images import decode_b64
from tests.servers import live_server

SHEET_PROMPTS = (
    *scenes.EXAMPLE_PROMPTS,
    "a small blue circle in the top left and a large pink square in the bottom right at sunset",
    "a large yellow triangle at the bottom on a purple background",
)
SHEET_SIZES = ((256, 256), (256, 256), (512, 512), (384, 256))


def generate(base_url: str, prompt: str, seed: int, width: int, height: int) -> Image.Image:
    result = sdk_client(base_url).images.generate(
        model="flux.1-dev",
        prompt=prompt,
        size=f"{width}x{height}",
        response_format="b64_json",
        extra_body={"seed": seed},
    )
    assert result.data is not None and result.data[0].b64_json is not None
    return decode_b64(result.data[0].b64_json)


def contact_sheet(base_url: str, path: Path) -> None:
    """One row per prompt: its caption, then the picture at each of `SHEET_SIZES`."""
    cell, label = 192, 260
    sheet = Image.new("RGB", (label + cell * len(SHEET_SIZES), cell * len(SHEET_PROMPTS)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(SHEET_PROMPTS):
        draw.multiline_text((8, row * cell + 8), textwrap.fill(prompt, 34), fill="black", spacing=4)
        for column, (width, height) in enumerate(SHEET_SIZES):
            image = generate(base_url, prompt, seed=column, width=width, height=height)
            image.thumbnail((cell - 8, cell - 8))
            sheet.paste(image, (label + column * cell + 4, row * cell + 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--sheet", type=Path, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="fluxstream-bench-"))
    engine = ThreadedEngine(
        create_flux_runner(ModelSpec(cache_dir=scratch / "cache")), max_queued=4
    )
    settings = Settings(data_dir=scratch / "images", cache_dir=scratch / "cache")
    with live_server(create_app(settings, engine)) as base_url:
        drawn = [
            scenes.random_scene(random.Random(10_000 + i), objects=1) for i in range(args.count)
        ]
        for side in args.sizes:
            verdicts = [
                judge(generate(base_url, scenes.caption(scene), i, side, side), scene)
                for i, scene in enumerate(drawn)
            ]
            print(f"{side}x{side}, default steps and guidance: {rates(verdicts)}")
        if args.sheet is not None:
            contact_sheet(base_url, args.sheet)


if __name__ == "__main__":
    main()
