from __future__ import annotations

import pytest

from stream.errors import InvalidRequest
from stream.sizes import (
    SIZES_1K,
    SizeRequest,
    default_generation_size,
    generation_size,
    resolve_size,
)

BUDGET = 4096 * 4096

TABLE_1K = [
    ("4:3", (1183, 887)),
    ("4:5", (916, 1145)),
    ("5:4", (1145, 916)),
    ("1:1", (1024, 1024)),
    ("3:4", (887, 1182)),
    ("2:3", (836, 1254)),
    ("3:2", (1254, 836)),
    ("9:16", (768, 1365)),
    ("16:9", (1365, 768)),
    ("9:21", (670, 1564)),
    ("21:9", (1563, 670)),
]


@pytest.mark.parametrize(("ratio", "size"), TABLE_1K)
def test_every_1k_row_resolves_through_size_ratio_and_aspect_ratio_with_tier(
    ratio: str, size: tuple[int, int]
) -> None:
    wxh = f"{size[0]}x{size[1]}"
    assert resolve_size(SizeRequest(size=wxh), BUDGET) == size
    assert resolve_size(SizeRequest(size=ratio), BUDGET) == size
    assert resolve_size(SizeRequest(aspect_ratio=ratio), BUDGET) == size
    assert resolve_size(SizeRequest(aspect_ratio=ratio, resolution="1K"), BUDGET) == size


def test_table_has_the_eleven_reference_shapes() -> None:
    assert len(SIZES_1K) == 11


@pytest.mark.parametrize(
    ("resolution", "size"),
    [
        ("0.5K", (512, 512)),
        ("1K", (1024, 1024)),
        ("2K", (2048, 2048)),
        ("4K", (4096, 4096)),
        ("0.25", (512, 512)),
        ("1", (1024, 1024)),
        ("3K", (4096, 4096)),
        ("0.7K", (512, 512)),
    ],
)
def test_resolution_tiers_map_to_the_nearest_supported_tier(
    resolution: str, size: tuple[int, int]
) -> None:
    assert resolve_size(SizeRequest(resolution=resolution), BUDGET) == size


def test_megapixels_is_the_same_knob_as_resolution() -> None:
    assert resolve_size(SizeRequest(megapixels="0.25", aspect_ratio="16:9"), BUDGET) == (683, 384)


def test_nearest_shape_compares_ratios_on_a_log_scale() -> None:
    assert resolve_size(SizeRequest(aspect_ratio="7:1"), BUDGET) == SIZES_1K[(21, 9)]
    assert resolve_size(SizeRequest(aspect_ratio="1.9:1"), BUDGET) == SIZES_1K[(16, 9)]


def test_size_wins_over_aspect_ratio_and_resolution() -> None:
    request = SizeRequest(size="640x480", aspect_ratio="9:16", resolution="4K")
    assert resolve_size(request, BUDGET) == (640, 480)


def test_tiers_over_the_budget_map_to_the_largest_that_fits() -> None:
    assert resolve_size(SizeRequest(resolution="4K"), 2048 * 2048) == (2048, 2048)


def test_default_is_1024_square() -> None:
    assert resolve_size(SizeRequest(), BUDGET) == (1024, 1024)
    assert resolve_size(SizeRequest(size="auto"), BUDGET) == (1024, 1024)


@pytest.mark.parametrize(
    "size", ["0x10", "14143x1", "big", "10x", "-5x5", "9" * 5000 + "x64", "64x" + "1" * 5000]
)
def test_bad_sizes_are_400_on_size(size: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        resolve_size(SizeRequest(size=size), BUDGET)
    assert raised.value.param == "size"


def test_size_over_the_pixel_budget_states_the_limit() -> None:
    with pytest.raises(InvalidRequest, match="at most 1000000 pixels"):
        resolve_size(SizeRequest(size="2000x2000"), 1_000_000)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("aspect_ratio", "wide"),
        ("resolution", "huge"),
        ("aspect_ratio", "9" * 400 + ":" + "9" * 400),  # both sides overflow a float
    ],
)
def test_bad_shape_or_tier_names_its_param(param: str, value: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        resolve_size(SizeRequest(**{param: value}), BUDGET)
    assert raised.value.param == param


def test_generation_size_rounds_each_side_up_to_a_multiple_of_16() -> None:
    assert generation_size(1183, 887) == (1184, 896)
    assert generation_size(1024, 1024) == (1024, 1024)
    assert generation_size(1, 1) == (16, 16)


@pytest.mark.parametrize(
    ("like", "expected"),
    [
        ((128, 96), (592, 444)),  # 4:3, few pixels: the 0.5K tier
        ((1200, 900), (1183, 887)),  # 4:3 near a megapixel: 1K
        ((1080, 1920), (768, 1365)),  # a phone portrait: 9:16 at 1K
        ((2000, 2000), (2048, 2048)),
        ((3000, 3000), (4096, 4096)),  # 9 MP is nearer 4K (16.8 MP) than 2K (4.2 MP)
        ((64, 64), (512, 512)),
    ],
)
def test_edit_without_size_keeps_the_input_shape_at_its_nearest_tier(
    like: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert resolve_size(SizeRequest(), BUDGET, like=like) == expected


def test_edit_fills_in_only_what_the_request_leaves_unsaid() -> None:
    like = (1200, 900)
    assert resolve_size(SizeRequest(size="300x200"), BUDGET, like=like) == (300, 200)
    assert resolve_size(SizeRequest(aspect_ratio="16:9"), BUDGET, like=like) == (1365, 768)
    assert resolve_size(SizeRequest(size="16:9"), BUDGET, like=like) == (1365, 768)
    assert resolve_size(SizeRequest(resolution="0.5K"), BUDGET, like=like) == (592, 444)
    assert resolve_size(SizeRequest(size="auto"), BUDGET, like=like) == (1183, 887)


def test_leading_zeros_do_not_change_a_size() -> None:
    assert resolve_size(SizeRequest(size="0" * 5000 + "64x064"), BUDGET) == (64, 64)


@pytest.mark.parametrize("param", ["resolution", "megapixels"])
def test_tiers_beyond_any_float_map_to_the_largest_tier(param: str) -> None:
    huge = SizeRequest(aspect_ratio="1:1", **{param: "9" * 400})
    assert resolve_size(huge, BUDGET) == (4096, 4096)


def test_ratios_beyond_any_float_map_to_the_most_extreme_shape() -> None:
    assert resolve_size(SizeRequest(aspect_ratio="9" * 400 + ":1"), BUDGET) == (1563, 670)
    assert resolve_size(SizeRequest(aspect_ratio="1:" + "9" * 400), BUDGET) == (670, 1564)


@pytest.mark.parametrize(
    ("max_pixels", "expected"), [(2048 * 2048, (1024, 1024)), (512 * 512, (512, 512))]
)
def test_the_warm_up_runs_at_the_size_a_request_without_one_gets(
    max_pixels: int, expected: tuple[int, int]
) -> None:
    assert default_generation_size(max_pixels) == expected


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (SizeRequest(), (256, 256)),
        (SizeRequest(aspect_ratio="16:9"), (341, 192)),
        (SizeRequest(aspect_ratio="16:9", resolution="1K"), (1365, 768)),
    ],
)
def test_a_model_s_default_size_sets_the_tier_a_request_leaves_unsaid(
    request_: SizeRequest, expected: tuple[int, int]
) -> None:
    """The embedded model draws at 256 px: a shape without a tier gets its pixel count."""
    assert resolve_size(request_, 2048 * 2048, default=(256, 256)) == expected
