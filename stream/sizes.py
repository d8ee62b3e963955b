"""Resolve `size`, `aspect_ratio`, `resolution` and `megapixels` to exact pixel sizes.

The rules are those of the FLUX.1 [dev] reference (`size` wins; shapes and tiers map to
the nearest supported value), plus FLUX's need for sides that are multiples of 16: we
generate at the next multiple of 16 and resize to the exact size resolved here. For an
edit, the input image stands in for what the request leaves unsaid: its shape for the
aspect ratio and its pixel count for the tier, each mapped to the nearest supported one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from stream.errors import InvalidRequest

MAX_SIDE = 14142
DEFAULT_SIZE = (1024, 1024)

# The reference's 1K table, by aspect ratio; its odd sides (887, 1182) are deliberate.
SIZES_1K: dict[tuple[int, int], tuple[int, int]] = {
    (4, 3): (1183, 887),
    (4, 5): (916, 1145),
    (5, 4): (1145, 916),
    (1, 1): (1024, 1024),
    (3, 4): (887, 1182),
    (2, 3): (836, 1254),
    (3, 2): (1254, 836),
    (9, 16): (768, 1365),
    (16, 9): (1365, 768),
    (9, 21): (670, 1564),
    (21, 9): (1563, 670),
}
# Resolution tiers as scale factors of the 1K table.
TIERS: dict[str, float] = {"0.5K": 0.5, "1K": 1.0, "2K": 2.0, "4K": 4.0}

_WXH = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_K_TIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[kK]\s*$")
_MP_TIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:[mM][pP])?\s*$")


@dataclass(frozen=True)
class SizeRequest:
    size: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    megapixels: str | None = None


def generation_size(width: int, height: int) -> tuple[int, int]:
    """The size FLUX generates at: each side rounded up to a multiple of 16."""
    return (-(-width // 16) * 16, -(-height // 16) * 16)


def default_generation_size(
    max_pixels: int, default: tuple[int, int] = DEFAULT_SIZE
) -> tuple[int, int]:
    """What a request that names no size generates: the size the warm-up runs at."""
    return generation_size(*resolve_size(SizeRequest(), max_pixels, default=default))


def parse_aspect_ratio(text: str, param: str) -> tuple[int, int]:
    """Map any `W:H` to the nearest supported shape, comparing ratios on a log scale."""
    match = _RATIO.match(text)
    width, height = (float(match[1]), float(match[2])) if match else (0.0, 0.0)
    # Numbers too long for a float are infinite; one of them makes an extreme shape, but
    # inf:inf is no ratio at all.
    if not (width > 0 and height > 0) or (math.isinf(width) and math.isinf(height)):
        raise InvalidRequest(
            f"{param} must look like '16:9' (two positive numbers); got {text!r}", param=param
        )
    return nearest_shape(width / height)


def nearest_shape(ratio: float) -> tuple[int, int]:
    """The supported shape closest to `ratio` (width / height), on a log scale; beyond the
    widest or tallest shape (up to an infinite ratio) that shape is the nearest."""
    wanted = math.log(_clamped(ratio, [width / height for width, height in SIZES_1K]))
    return min(SIZES_1K, key=lambda shape: abs(math.log(shape[0] / shape[1]) - wanted))


def nearest_tier(scale: float) -> float:
    """The supported tier closest to `scale` (a factor of the 1K sides), on a log scale;
    beyond the largest tier (up to an infinite scale) that tier is the nearest."""
    wanted = _clamped(scale, list(TIERS.values()))
    return min(TIERS.values(), key=lambda tier: abs(math.log(tier / wanted)))


def _clamped(value: float, supported: list[float]) -> float:
    return min(max(value, min(supported)), max(supported))


def parse_tier(text: str, param: str) -> float:
    """Map a `K` tier ('2K') or a megapixel count ('0.25', '1', '4MP') to the nearest tier."""
    if match := _K_TIER.match(text):
        scale = float(match[1])
    elif match := _MP_TIER.match(text):
        scale = math.sqrt(float(match[1]))
    else:
        raise InvalidRequest(
            f"{param} must be a tier like '1K' or a megapixel count like '0.25'; got {text!r}",
            param=param,
        )
    if scale <= 0:
        raise InvalidRequest(f"{param} must be positive; got {text!r}", param=param)
    return nearest_tier(scale)


def scaled(shape: tuple[int, int], tier: float) -> tuple[int, int]:
    width, height = SIZES_1K[shape]
    return (max(1, int(width * tier + 0.5)), max(1, int(height * tier + 0.5)))


def resolve_size(
    request: SizeRequest,
    max_pixels: int,
    like: tuple[int, int] | None = None,
    default: tuple[int, int] = DEFAULT_SIZE,
) -> tuple[int, int]:
    """The exact output size for a request, within the server's pixel budget; `like` is the
    size of an edit's input image, whose shape and tier fill in what the request omits, and
    `default` the model's size for a request that says nothing of size at all."""
    size = (request.size or "").strip()
    if size and size.lower() != "auto":
        if match := _WXH.match(size):
            return _checked_wxh(_side(match[1]), _side(match[2]), max_pixels)
        if _RATIO.match(size):
            return _tiered(parse_aspect_ratio(size, "size"), request, max_pixels, like)
        raise InvalidRequest(
            f"size must be 'WxH' (e.g. '1024x1024'), 'W:H' (e.g. '16:9') or 'auto'; got {size!r}",
            param="size",
        )
    unsaid = request.aspect_ratio is None and request.resolution is None
    if unsaid and request.megapixels is None and like is None:
        return _fit_budget(default, max_pixels)
    if request.aspect_ratio:
        shape = parse_aspect_ratio(request.aspect_ratio, "aspect_ratio")
    else:
        shape = nearest_shape(like[0] / like[1]) if like else (1, 1)
    # A shape without a tier gets the pixel count of the model's default size.
    default_tier = math.sqrt(_pixels(default) / _pixels(DEFAULT_SIZE))
    return _tiered(shape, request, max_pixels, like, default_tier)


def _tiered(
    shape: tuple[int, int],
    request: SizeRequest,
    max_pixels: int,
    like: tuple[int, int] | None = None,
    default_tier: float = 1.0,
) -> tuple[int, int]:
    if request.resolution is not None:
        tier = parse_tier(request.resolution, "resolution")
    elif request.megapixels is not None:
        tier = parse_tier(request.megapixels, "megapixels")
    elif like is not None:
        tier = nearest_tier(math.sqrt(_pixels(like) / _pixels(SIZES_1K[shape])))
    else:
        tier = default_tier
    fitting = [t for t in TIERS.values() if t <= tier and _pixels(scaled(shape, t)) <= max_pixels]
    return scaled(shape, max(fitting)) if fitting else _fit_budget(scaled(shape, tier), max_pixels)


def _fit_budget(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """Shrink a size (keeping its shape) until it fits the budget; used for tiny budgets."""
    if _pixels(size) <= max_pixels:
        return size
    factor = math.sqrt(max_pixels / _pixels(size))
    return (max(1, int(size[0] * factor)), max(1, int(size[1] * factor)))


def _side(digits: str) -> int:
    """One side of `WxH`. Python refuses to convert numbers of thousands of digits, and any
    number longer than `MAX_SIDE` is too large anyway, so long ones are not converted."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(MAX_SIDE)):
        raise _side_out_of_range(f"a side of {len(significant)} digits")
    return int(significant)


def _checked_wxh(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise _side_out_of_range(f"{width}x{height}")
    if width * height > max_pixels:
        raise InvalidRequest(
            f"size {width}x{height} has {width * height} pixels; this server allows at most "
            f"{max_pixels} pixels per image",
            param="size",
        )
    return (width, height)


def _side_out_of_range(got: str) -> InvalidRequest:
    return InvalidRequest(
        f"each side of size must be between 1 and {MAX_SIDE} pixels; got {got}", param="size"
    )


def _pixels(size: tuple[int, int]) -> int:
    return size[0] * size[1]
