"""`acceleration` and `go_fast`: real speed-ups that work on any device.

Both levels use diffusers' first-block cache: at each step the transformer runs its first
block, and when that block's output residual changed by less than `threshold` (relative
mean absolute difference) since the last fully computed step, the remaining blocks are
skipped and their cached residual is reused. A higher threshold skips more steps: faster,
further from the uncached image. `bench/acceleration.py` measures both levels.

Thresholds are FLUX's usual ones: real FLUX changes its first-block residual by a few
percent per step late in the schedule (0.08 is the usual "no visible loss" setting). The
trained embedded model behaves alike (`bench/acceleration.py`: at 256 px and 28 steps,
`regular` skips 7 steps for a mean difference of 0.5 levels, `high` 16 for 2.9).

`go_fast` asks for fp8 weights plus `torch.compile`. Those are start-up choices of the
server (`--quantize fp8 --compile on`, see `pipeline/speedups.py`): a compiled fp8 model
cannot be built per request. Where the loaded model runs both, `go_fast` is already in effect;
elsewhere (no fp8-capable GPU, a CPU) it falls back to the nearest real speed-up, the `high`
cache, and the response says which in `speedup`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from diffusers import FluxTransformer2DModel
from diffusers.hooks import FirstBlockCacheConfig

from pipeline.jobs import Acceleration, Job

Thresholds = Mapping[Acceleration, float]
FLUX_THRESHOLDS: Thresholds = {"regular": 0.08, "high": 0.15}
GO_FAST_FALLBACK: Acceleration = "high"


@dataclass(frozen=True)
class AppliedSpeedup:
    acceleration: Acceleration
    threshold: float | None
    description: str


def plan_speedup(job: Job, thresholds: Thresholds, startup: tuple[str, ...] = ()) -> AppliedSpeedup:
    """What a job will run with, in the words the response reports; `startup` lists the
    speed-ups applied when the model was loaded (`ModelProfile.speedups`)."""
    level = job.acceleration
    fast_model = runs_fp8_compiled(startup)
    if job.go_fast and not fast_model and _rank(GO_FAST_FALLBACK) > _rank(level):
        level = GO_FAST_FALLBACK
    threshold = thresholds.get(level)
    words = "none" if threshold is None else f"first-block cache, threshold {threshold}"
    if job.go_fast and fast_model:
        words += " (go_fast: the model runs fp8 + compile since start-up)"
    elif job.go_fast:
        words += f" (go_fast: fp8 + compile is not enabled here, so acceleration={level})"
    return AppliedSpeedup(level, threshold, words)


def runs_fp8_compiled(startup: tuple[str, ...]) -> bool:
    return any(s.startswith("fp8") for s in startup) and runs_compiled(startup)


def runs_compiled(startup: tuple[str, ...]) -> bool:
    return any(s.startswith("regional-compile") for s in startup)


def apply_speedup(transformer: FluxTransformer2DModel, speedup: AppliedSpeedup) -> None:
    """Set the cache for the next call; always a fresh one, so that no state from an
    earlier (possibly cancelled) job can leak into this one."""
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    if speedup.threshold is not None:
        transformer.enable_cache(FirstBlockCacheConfig(threshold=speedup.threshold))


def _rank(level: Acceleration) -> int:
    return ("none", "regular", "high").index(level)
