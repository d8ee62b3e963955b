"""Every start-up switch on the CPU: it works on the embedded model, or it is refused clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from pipeline import speedups
from pipeline.factory import create_flux_runner, warmup_jobs
from pipeline.fp8 import FP8, Float8RowwiseLinear
from pipeline.jobs import Job
from pipeline.loading import ModelLoadError, ModelSpec, prepare_pipeline, startup_speedups
from pipeline.speedups import Speedups


def generate(spec: ModelSpec) -> np.ndarray:
    pipe, _ = prepare_pipeline(spec)
    image: Image.Image = pipe(
        prompt="a red fox",
        width=64,
        height=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    return np.asarray(image, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def plain(model_cache: Path) -> np.ndarray:
    return generate(ModelSpec(cache_dir=model_cache))


def test_fp8_linear_matches_the_float_linear_closely() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    expected = linear(x)
    relative = (Float8RowwiseLinear(linear)(x) - expected).norm() / expected.norm()
    assert relative < 0.1


def test_fp8_on_the_cpu_generates_nearly_the_same_image(
    model_cache: Path, plain: np.ndarray
) -> None:
    quantized = generate(ModelSpec(cache_dir=model_cache, speedups=Speedups(quantize="fp8")))
    assert 25 < psnr(quantized, plain) < float("inf")


@pytest.mark.parametrize(
    ("spec_fields", "weight_dtype"),
    [({"dtype": "bfloat16"}, torch.bfloat16), ({"speedups": Speedups(quantize="fp8")}, FP8)],
)
def test_serving_runner_keeps_the_loaded_weight_dtype_and_generates(
    model_cache: Path, spec_fields: dict[str, Any], weight_dtype: torch.dtype
) -> None:
    runner = create_flux_runner(ModelSpec(cache_dir=model_cache, **spec_fields))
    job = Job("a red fox", 64, 64, seeds=(3,), num_inference_steps=2, guidance_scale=3.5)
    result = runner.run(job, lambda event: None, lambda: False)
    linear = runner.pipe.transformer.transformer_blocks[0].ff.net[2]
    weight = getattr(linear, "weight_fp8", getattr(linear, "weight", None))
    assert weight is not None and weight.dtype == weight_dtype
    assert result.images[0].size == (64, 64)


def test_compiled_model_after_its_warm_up_serves_any_size_n_and_acceleration_uncompiled(
    model_cache: Path,
) -> None:
    # The eager backend traces with dynamo exactly as inductor does: a block that dynamo
    # cannot trace with the cache's hooks fails here the same way, and each graph dynamo
    # captures is one that inductor would compile.
    speedups = Speedups(compile="on", compile_backend="eager")
    runner = create_flux_runner(ModelSpec(cache_dir=model_cache, speedups=speedups))
    warmups = warmup_jobs(runner.profile, (256, 256))
    results = [runner.run(job, lambda event: None, lambda: False) for job in warmups]
    assert {result.acceleration for result in results} == {"none", "high"}
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    for width, height, seeds, acceleration in [
        (192, 128, (1,), "none"),
        (64, 320, (1, 2, 3), "regular"),
        (128, 128, (4, 5), "high"),
    ]:
        job = Job("a fox", width, height, seeds, 2, 3.5, acceleration=acceleration)
        assert len(runner.run(job, lambda event: None, lambda: False).images) == len(seeds)
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up


def test_fp8_on_a_gpu_without_fp8_serves_in_bf16_and_says_so(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(speedups, "fp8_supported", lambda device: False)
    pipe, applied = prepare_pipeline(
        ModelSpec(cache_dir=model_cache, speedups=Speedups(quantize="fp8"))
    )
    assert applied == ("no-fp8-on-this-gpu(bf16)",)
    assert not any(isinstance(m, Float8RowwiseLinear) for m in pipe.transformer.modules())
    assert "no fp8 matmuls; serving in bf16" in caplog.text


def test_torchao_fp8_on_the_cpu_is_refused_with_a_reason(model_cache: Path) -> None:
    spec = ModelSpec(cache_dir=model_cache, speedups=Speedups(quantize="fp8-torchao"))
    with pytest.raises(ModelLoadError, match=r"need a CUDA GPU .* use --quantize fp8"):
        prepare_pipeline(spec)


def test_fused_qkv_gives_the_same_image(model_cache: Path, plain: np.ndarray) -> None:
    fused = generate(ModelSpec(cache_dir=model_cache, speedups=Speedups(fuse_qkv="on")))
    assert psnr(fused, plain) > 45


def test_regional_compile_gives_the_same_image(model_cache: Path, plain: np.ndarray) -> None:
    # The eager backend runs the same dynamo capture of the repeated blocks as inductor,
    # without the minutes inductor needs on two CPU cores.
    speedups = Speedups(compile="on", compile_backend="eager")
    assert psnr(generate(ModelSpec(cache_dir=model_cache, speedups=speedups)), plain) > 45


def test_cpu_path_applies_nothing_by_default(model_cache: Path) -> None:
    _, applied = prepare_pipeline(ModelSpec(cache_dir=model_cache))
    assert applied == ()


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_on_the_cpu_is_refused_with_a_reason(model_cache: Path, offload: str) -> None:
    with pytest.raises(ModelLoadError, match="nothing to offload"):
        prepare_pipeline(ModelSpec(cache_dir=model_cache, offload=offload))  # type: ignore[arg-type]


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_model_is_not_compiled_by_default(offload: str) -> None:
    spec = ModelSpec(offload=offload)  # type: ignore[arg-type]
    assert startup_speedups(spec).compile == "off"
    assert startup_speedups(ModelSpec()).compile == "auto"


def test_unknown_attention_backend_is_refused_with_a_reason(model_cache: Path) -> None:
    spec = ModelSpec(cache_dir=model_cache, speedups=Speedups(attention_backend="warp-drive"))
    with pytest.raises(ModelLoadError, match="warp-drive"):
        prepare_pipeline(spec)


def test_gpu_session_script_runs_every_measurement_on_the_cpu_in_tiny_mode(tmp_path: Path) -> None:
    environment = {**os.environ, "OUT": str(tmp_path), "BENCH_GPU_ARGS": "--tiny"}
    environment["PATH"] = f"{Path(sys.executable).parent}:{environment['PATH']}"
    subprocess.run(
        ["bash", "bench/gpu_session.sh"],
        check=True,
        capture_output=True,
        env=environment,
        timeout=600,
    )
    runs = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert sorted(runs) == ["bf16", "bf16-restart", "fp8"]
    result = runs["bf16"]
    assert [m["partial_images"] for m in result["measurements"]] == [0, 3]
    assert all(m["step_ms"] > 0 and m["image_s"] > 0 for m in result["measurements"])
    assert result["warmup_s"] > 0 and result["first_after_ready_ratio"] > 0
    assert result["attention_ms"]["native"] > 0 and result["other_shape_first_ratio"] > 0
    assert runs["fp8"]["fp8_psnr_vs_bf16_db"] > 25
    assert "need a CUDA GPU" in (tmp_path / "fp8-torchao.txt").read_text()
