from __future__ import annotations

import pytest

from pipeline.previews import preview_steps


@pytest.mark.parametrize(
    ("total", "k", "expected"),
    [
        (8, 3, (2, 4, 6)),
        (28, 3, (7, 14, 21)),
        (8, 1, (4,)),
        (4, 3, (1, 2, 3)),
        (3, 3, (1, 2)),
        (1, 3, ()),
        (28, 0, ()),
    ],
)
def test_previews_are_evenly_spread_distinct_and_never_on_the_last_step(
    total: int, k: int, expected: tuple[int, ...]
) -> None:
    steps = preview_steps(total, k)
    assert steps == expected
    assert len(set(steps)) == len(steps)
    assert all(1 <= step < total for step in steps)
