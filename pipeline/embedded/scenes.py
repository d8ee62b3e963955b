"""The scene world the embedded model was trained on: one grammar for captions and pictures.

A scene is a background (a plain colour, or a sky: blue, sunset, night) and one or two
objects, each a shape with a colour, a size and a position. `caption` writes the sentence
and `render` draws the picture, at any size and aspect ratio, so the two always agree. The
grammar is a public contract: the README lists it, the demo page offers prompts from it,
and `pipeline.embedded.judge` checks generated pictures against it.

Pictures are drawn with signed distances and a one-pixel soft edge (anti-aliased, no
supersampling), in numpy, so a batch of training pictures costs a few milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (1.00, 0.90, 0.10),
    "green": (0.10, 0.68, 0.20),
    "blue": (0.12, 0.30, 0.90),
    "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.55, 0.78),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}
# Skies as (top, bottom) colours of a vertical gradient, with the phrase that names them.
SKIES: dict[str, tuple[str, tuple[float, float, float], tuple[float, float, float]]] = {
    "sky": ("under a blue sky", (0.25, 0.50, 0.95), (0.65, 0.82, 1.00)),
    "sunset": ("at sunset", (0.35, 0.18, 0.50), (1.00, 0.60, 0.25)),
    "night": ("at night", (0.02, 0.02, 0.10), (0.08, 0.10, 0.28)),
}
SHAPES = ("circle", "square", "triangle", "star", "house", "tree")
SIZES = {"small": 0.13, "large": 0.22}
# Centre of each position as fractions of width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
    "top left": (0.25, 0.27),
    "top right": (0.75, 0.27),
    "bottom left": (0.25, 0.73),
    "bottom right": (0.75, 0.73),
}
_TRUNK = (0.45, 0.28, 0.12)
# Colours an object may not take on a background, or it would vanish into it.
_CLASHES = {"sky": {"blue"}, "night": {"black", "blue"}, "sunset": {"orange", "purple"}}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    # Jitter of the centre (fractions of the image) and of the size (a factor).
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class Scene:
    """`background` is a colour name (a plain background) or a key of `SKIES`."""

    background: str
    objects: tuple[SceneObject, ...]

    @property
    def is_sky(self) -> bool:
        return self.background in SKIES


def position_phrase(position: str) -> str:
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return "in the center" if position == "center" else f"in the {position}"


def background_phrase(background: str) -> str:
    return SKIES[background][0] if background in SKIES else f"on a {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(item: SceneObject, *, size: bool = True, position: bool = True) -> str:
    words = ([item.size] if size else []) + [item.colour, item.shape]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    return f"{phrase} {position_phrase(item.position)}" if position else phrase


def caption(scene: Scene, *, sizes: bool = True, positions: bool = True) -> str:
    """The sentence for `scene`; without `sizes` or `positions` it leaves those words out
    (the scene still has them: a caption that omits them allows any)."""
    phrases = [object_phrase(o, size=sizes, position=positions) for o in scene.objects]
    return f"{' and '.join(phrases)} {background_phrase(scene.background)}"


def _apart(first: str, second: str) -> bool:
    (x1, y1), (x2, y2) = POSITIONS[first], POSITIONS[second]
    return abs(x1 - x2) >= 0.5 or abs(y1 - y2) >= 0.45


def random_scene(rng: random.Random, *, objects: int | None = None) -> Scene:
    """A scene drawn uniformly from the grammar (one object or two, equally often)."""
    background = rng.choice([*COLOURS, *SKIES, *SKIES])
    banned = _CLASHES.get(background, {background})
    count = objects or rng.choice((1, 2))
    items: list[SceneObject] = []
    # Two objects never share the center: nothing would be apart from it.
    places = [p for p in POSITIONS if count == 1 or p != "center"]
    while len(items) < count:
        position = rng.choice(places)
        if any(not _apart(position, other.position) for other in items):
            continue
        items.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice([c for c in COLOURS if c not in banned]),
                # Two objects are never both large: they would overlap.
                size="small" if items and items[0].size == "large" else rng.choice(list(SIZES)),
                position=position,
                dx=rng.uniform(-0.04, 0.04),
                dy=rng.uniform(-0.04, 0.04),
                scale=rng.uniform(0.9, 1.1),
            )
        )
    return Scene(background, tuple(items))


def _background(scene: Scene, height: int, width: int) -> np.ndarray:
    if scene.is_sky:
        _, top, bottom = SKIES[scene.background]
        t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        column = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
        return np.broadcast_to(column, (height, width, 3)).copy()
    return np.broadcast_to(
        np.asarray(COLOURS[scene.background], np.float32), (height, width, 3)
    ).copy()


def _coverage(distance: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) to a coverage in [0, 1]."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _box(x: np.ndarray, y: np.ndarray, cx: float, cy: float, hw: float, hh: float) -> np.ndarray:
    return np.maximum(np.abs(x - cx) - hw, np.abs(y - cy) - hh)


def _triangle(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """An upright isosceles triangle of height 2r and base 2r centred on (cx, cy)."""
    top, bottom = cy - r, cy + r
    # Sides through the apex and the base corners; normals scaled to unit length.
    norm = np.sqrt(1 + 0.25)
    left = ((cx - x) - 0.5 * (y - top)) / norm
    right = ((x - cx) - 0.5 * (y - top)) / norm
    return np.maximum.reduce([y - bottom, left, right])


def _star(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """A five-pointed star, point up, with straight edges: in polar coordinates each edge
    from a tip (radius r) to a notch (radius 0.42 r) is the line rho = p / cos(theta - phi)."""
    dx, dy = x - cx, y - cy
    sector = np.pi / 5
    theta = np.abs(np.mod(np.arctan2(dx, -dy) + sector, 2 * sector) - sector)
    tip, notch = np.array([r, 0.0]), 0.42 * r * np.array([np.cos(sector), np.sin(sector)])
    normal = np.array([notch[1] - tip[1], tip[0] - notch[0]])
    normal /= np.linalg.norm(normal)
    p, phi = float(normal @ tip), float(np.arctan2(normal[1], normal[0]))
    edge = p / np.cos(theta - phi)
    return (np.sqrt(dx * dx + dy * dy) - edge) * 0.7


Layer = tuple[np.ndarray, tuple[float, float, float]]


def _layers(
    item: SceneObject, x: np.ndarray, y: np.ndarray, width: int, height: int
) -> list[Layer]:
    """The object's parts as (signed distance, colour), painted in order."""
    px, py = POSITIONS[item.position]
    cx, cy = (px + item.dx) * width, (py + item.dy) * height
    r = SIZES[item.size] * item.scale * min(width, height)
    colour = COLOURS[item.colour]
    shapes: dict[str, Callable[[], list[Layer]]] = {
        "circle": lambda: [(np.hypot(x - cx, y - cy) - r, colour)],
        "square": lambda: [(_box(x, y, cx, cy, 0.85 * r, 0.85 * r), colour)],
        "triangle": lambda: [(_triangle(x, y, cx, cy, r), colour)],
        "star": lambda: [(_star(x, y, cx, cy, 1.15 * r), colour)],
        "house": lambda: [
            (_box(x, y, cx, cy + 0.35 * r, 0.7 * r, 0.65 * r), colour),
            (_triangle(x, y, cx, cy - 0.6 * r, 0.4 * r) * 1.0, colour),
            (_box(x, y, cx, cy + 0.7 * r, 0.18 * r, 0.3 * r), (0.2, 0.12, 0.06)),
        ],
        "tree": lambda: [
            (_box(x, y, cx, cy + 0.65 * r, 0.14 * r, 0.4 * r), _TRUNK),
            (np.hypot(x - cx, y - (cy - 0.25 * r)) - 0.7 * r, colour),
        ],
    }
    return shapes[item.shape]()


# Drawing styles, for the example LoRAs (`pipeline.embedded.train_loras`): "outline" draws
# each part's edge as a line instead of filling it; "pastel" mixes every colour with white.
STYLES = ("plain", "outline", "pastel")
OUTLINE_WIDTH = 0.035  # of the shorter side
PASTEL_WHITE = 0.5


def render(scene: Scene, width: int, height: int, *, style: str = "plain") -> np.ndarray:
    """The scene as float32 RGB in [0, 1], shape (height, width, 3), in one of `STYLES`."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {', '.join(STYLES)}")
    image = _background(scene, height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    half_line = OUTLINE_WIDTH * min(width, height) / 2
    for item in scene.objects:
        for distance, colour in _layers(item, x, y, width, height):
            if style == "outline":
                distance = np.abs(distance) - half_line
            alpha = _coverage(distance)[..., None]
            image = image * (1 - alpha) + alpha * np.asarray(colour, np.float32)
    if style == "pastel":
        # Every colour mixed with white is the whole picture mixed with white: blending is linear.
        image = (1 - PASTEL_WHITE) * image + PASTEL_WHITE
    return image.astype(np.float32)


def object_mask(item: SceneObject, width: int, height: int) -> np.ndarray:
    """Where `item` covers the picture (coverage in [0, 1]), for weighting and checking."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    layers = [_coverage(distance) for distance, _ in _layers(item, x, y, width, height)]
    return np.maximum.reduce(layers).astype(np.float32)


# Prompts from the grammar that the demo page and the README offer a newcomer.
EXAMPLE_PROMPTS = (
    "a large red circle on the left and a small yellow star on the right at sunset",
    "a red circle on a blue background",
    "a small white house at the bottom under a blue sky",
    "a large green tree in the center at night",
    "a purple triangle in the top right on a yellow background",
    "a large orange square on the left on a black background",
)
