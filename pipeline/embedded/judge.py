"""Check a generated picture against the one-object scene its caption describes.

The embedded model's promise is that it follows prompts from its grammar; this is how the
tests and `bench/prompt_following.py` measure that, from pixels alone. The background is
the nearest of the world's backgrounds to the picture's top and bottom rows; the object is
every pixel far from its row's background colour (the row's median, unless an object
covers most of the row: see `row_backgrounds`); its colour is the nearest palette colour
to their median, its position the side of the picture its centroid falls in, and its shape
(circle, square or triangle) the one whose fill of its bounding box is nearest (π/4, 1, 1/2).

Two position checks: `position` wants every half the caption names (a "top left" object
in the top half and the left half; a centred one in the middle box), `side` only the
issue's "rough position", the left or right half where the caption names one (else the
same as `position`). A corner object on the right side but the wrong row counts for
`side`, not for `position`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.embedded.scenes import COLOURS, POSITIONS, SKIES, Scene

FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
# RGB distance (0-1 scale) from the row's background beyond which a pixel is the object's.
_FOREGROUND = 0.3
_MIN_OBJECT_SHARE = 0.002


@dataclass(frozen=True)
class Verdict:
    background: bool
    colour: bool
    position: bool
    side: bool
    # None where the shape has no fill-ratio test (star, house, tree).
    shape: bool | None


def _backgrounds() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    plain = {name: (np.array(rgb), np.array(rgb)) for name, rgb in COLOURS.items()}
    skies = {name: (np.array(top), np.array(bottom)) for name, (_, top, bottom) in SKIES.items()}
    return plain | skies


def _nearest(colour: np.ndarray, palette: dict[str, np.ndarray]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(palette[name] - colour)))


def row_backgrounds(pixels: np.ndarray) -> np.ndarray:
    """Each row's background colour, (height, 3). A row's median is its background while
    the background covers most of the row; where a drawn object covers more, the median is
    the object's colour and the row's background would be taken for the object (a stripe
    across the picture that ruins the shape's bounding box). The world's backgrounds are
    plain or a vertical linear gradient, and cover most of a picture's pixels, so a straight
    line in y fitted to the pixels, each time to the half nearest the last fit, is the
    background; a row whose median is far from it takes the line's colour instead."""
    rows: np.ndarray = np.median(pixels, axis=1)
    heights = np.linspace(0.0, 1.0, len(rows))
    step = max(1, min(pixels.shape[:2]) // 64)
    sample = pixels[::step, ::step]
    height = np.repeat(heights[::step], sample.shape[1])
    colours = sample.reshape(-1, 3)
    kept = np.ones(len(colours), bool)
    for _ in range(4):
        slope, offset = np.polyfit(height[kept], colours[kept], 1)
        distance = np.linalg.norm(colours - (np.outer(height, slope) + offset), axis=-1)
        kept = distance <= np.median(distance)
    line = np.outer(heights, slope) + offset
    strays = np.linalg.norm(rows - line, axis=-1) > _FOREGROUND
    return np.where(strays[:, None], line, rows)


def _background(rows: np.ndarray) -> str:
    """The background whose colours at the top and bottom tenth of the picture are nearest
    to the row medians there (a plain colour has the same colour at both)."""
    band = max(1, len(rows) // 10)
    seen = np.concatenate([rows[:band].mean(axis=0), rows[-band:].mean(axis=0)])
    candidates = {
        name: np.concatenate([top + (bottom - top) * 0.05, top + (bottom - top) * 0.95])
        for name, (top, bottom) in _backgrounds().items()
    }
    return _nearest(seen, candidates)


def _position_right(centroid: tuple[float, float], position: str) -> bool:
    x, y = centroid
    want_x, want_y = POSITIONS[position]
    checks = []
    if want_x != 0.5:
        checks.append((x < 0.5) == (want_x < 0.5))
    if want_y != 0.5:
        checks.append((y < 0.5) == (want_y < 0.5))
    if not checks:  # center
        checks.append(0.3 <= x <= 0.7 and 0.3 <= y <= 0.7)
    return all(checks)


def _side_right(centroid: tuple[float, float], position: str) -> bool:
    want_x, _ = POSITIONS[position]
    if want_x == 0.5:
        return _position_right(centroid, position)
    return (centroid[0] < 0.5) == (want_x < 0.5)


def judge(image: Image.Image, scene: Scene) -> Verdict:
    """How `image` fares against `scene`, which must have exactly one object."""
    (item,) = scene.objects
    pixels = np.asarray(image.convert("RGB"), np.float32) / 255
    rows = row_backgrounds(pixels)
    background = _background(rows)
    distance = np.linalg.norm(pixels - rows[:, None, :], axis=-1)
    mask = distance > _FOREGROUND
    if mask.mean() < _MIN_OBJECT_SHARE:
        missing = False if item.shape in FILL_RATIOS else None
        return Verdict(background == scene.background, False, False, False, missing)
    colour = _nearest(np.median(pixels[mask], axis=0), {k: np.array(v) for k, v in COLOURS.items()})
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    centroid = (float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height)
    shape = None
    if item.shape in FILL_RATIOS:
        fill = mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
        shape = min(FILL_RATIOS, key=lambda name: abs(FILL_RATIOS[name] - fill)) == item.shape
    return Verdict(
        background=background == scene.background,
        colour=colour == item.colour,
        position=_position_right(centroid, item.position),
        side=_side_right(centroid, item.position),
        shape=shape,
    )


@dataclass(frozen=True)
class Rates:
    count: int
    background: float
    colour: float
    position: float
    side: float
    shape: float

    def __str__(self) -> str:
        return (
            f"{self.count} images: background {self.background:.0%}, colour {self.colour:.0%}, "
            f"position {self.position:.0%} (side {self.side:.0%}), shape {self.shape:.0%}"
        )


def rates(verdicts: Iterable[Verdict]) -> Rates:
    listed = list(verdicts)
    shaped = [v.shape for v in listed if v.shape is not None]
    return Rates(
        count=len(listed),
        background=float(np.mean([v.background for v in listed])),
        colour=float(np.mean([v.colour for v in listed])),
        position=float(np.mean([v.position for v in listed])),
        side=float(np.mean([v.side for v in listed])),
        shape=float(np.mean(shaped)) if shaped else float("nan"),
    )
