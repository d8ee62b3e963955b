"""What `acceleration` and `go_fast` resolve to, from the job and the start-up speed-ups."""

from __future__ import annotations

import pytest

from pipeline.acceleration import FLUX_THRESHOLDS, plan_speedup
from pipeline.jobs import Acceleration, Job


def job(acceleration: Acceleration = "none", go_fast: bool = False) -> Job:
    return Job(
        prompt="x",
        width=64,
        height=64,
        seeds=(1,),
        num_inference_steps=2,
        guidance_scale=3.5,
        acceleration=acceleration,
        go_fast=go_fast,
    )


@pytest.mark.parametrize(
    ("level", "threshold"), [("none", None), ("regular", 0.08), ("high", 0.15)]
)
def test_each_level_is_a_first_block_cache_threshold(level: Acceleration, threshold: float) -> None:
    assert plan_speedup(job(level), FLUX_THRESHOLDS).threshold == threshold


@pytest.mark.parametrize(
    ("startup", "level", "words"),
    [
        ((), "high", "fp8 + compile is not enabled here, so acceleration=high"),
        (("fp8-rowwise(4 linears)",), "high", "not enabled here"),
        (("fp8-rowwise(4 linears)", "regional-compile(inductor)"), "none", "since start-up"),
    ],
)
def test_go_fast_is_fp8_and_compile_where_loaded_else_the_high_cache(
    startup: tuple[str, ...], level: str, words: str
) -> None:
    applied = plan_speedup(job(go_fast=True), FLUX_THRESHOLDS, startup)
    assert applied.acceleration == level and words in applied.description


def test_go_fast_never_lowers_an_explicit_level() -> None:
    assert plan_speedup(job("high", go_fast=True), FLUX_THRESHOLDS).acceleration == "high"
