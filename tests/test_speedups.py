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
from diffusers import FluxTransformer2DModel
from PIL import Image
from torch._dynamo.utils import counters

from pipeline import loading, speedups
from pipeline.factory import create_flux_runner, warmup_jobs
from pipeline.fp8 import FP8, Float8RowwiseLinear
from pipeline.jobs import Acceleration, Job, Preview
from pipeline.loading import (
    EMBEDDED,
    ModelLoadError,
    ModelSpec,
    load_pipeline,
    model_profile,
    prepare_pipeline,
    startup_speedups,
)
from pipeline.previews import AutoencoderPreviewDecoder, LinearPreviewDecoder
from pipeline.runner import FluxRunner
from pipeline.speedups import SpeedupError, Speedups, apply_speedups
from tests.images import psnr


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


def mini_flux_runner(model_cache: Path, speedups: Speedups) -> FluxRunner:
    """The embedded model with 3 double and 4 single random blocks: enough blocks that the
    first-block cache has a head, middle and tail block in each list, as FLUX has."""
    pipe = load_pipeline(ModelSpec(cache_dir=model_cache))
    config = {**pipe.transformer.config, "num_layers": 3, "num_single_layers": 4}
    pipe.transformer = FluxTransformer2DModel.from_config(config)
    applied = apply_speedups(pipe, speedups, torch.device("cpu"), model_cache)
    decoder = LinearPreviewDecoder(weight=torch.zeros(3, 16), bias=torch.zeros(3))
    return FluxRunner(pipe, model_profile(EMBEDDED, pipe, applied), {"linear": decoder})


def test_compiled_model_after_its_warm_up_serves_any_size_n_and_acceleration_uncompiled(
    model_cache: Path,
) -> None:
    # The eager backend traces with dynamo exactly as inductor does: a block that dynamo
    # cannot trace with the cache's hooks fails here the same way, each graph dynamo
    # captures is one that inductor would compile, and a block past dynamo's recompile
    # limit, which would silently run eager, fails the test.
    torch._dynamo.reset()
    speedups = Speedups(compile="on", compile_backend="eager")
    runner = mini_flux_runner(model_cache, speedups)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for job in warmup_jobs(runner.profile, (128, 128)):
            runner.run(job, lambda event: None, lambda: False)
        graphs_after_warm_up = counters["stats"]["unique_graphs"]
        requests: list[tuple[int, int, tuple[int, ...], Acceleration]] = [
            (192, 128, (1,), "none"),
            (64, 320, (1, 2, 3), "regular"),
            (128, 128, (4, 5), "high"),
            (128, 128, (6,), "high"),
        ]
        for width, height, seeds, acceleration in requests:
            job = Job("a fox", width, height, seeds, 3, 3.5, acceleration=acceleration)
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
    assert sorted(runs) == ["bf16", "bf16-restart", "embedded", "fp8", "lora", "lora-fp8"]
    result = runs["bf16"]
    assert [m["partial_images"] for m in result["measurements"]] == [0, 3]
    assert all(m["step_ms"] > 0 and m["image_s"] > 0 for m in result["measurements"])
    assert result["warmup_s"] > 0 and result["first_after_ready_ratio"] > 0
    assert result["attention_ms"]["native"] > 0 and result["other_shape_first_ratio"] > 0
    assert runs["fp8"]["fp8_psnr_vs_bf16_db"] > 25
    assert runs["lora"]["graphs_compiled_after_warmup"] == 0
    assert set(runs["lora"]["loras"]["measurements"]) == {"1", "2"}
    assert runs["lora-fp8"]["fp8_lora_psnr_vs_bf16_lora_db"] > 25
    assert "need a CUDA GPU" in (tmp_path / "fp8-torchao.txt").read_text()


UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_fused_qkv_drops_the_unfused_projections_and_quantizes_only_what_runs(
    model_cache: Path, quantize: str
) -> None:
    plain = load_pipeline(ModelSpec(cache_dir=model_cache))
    parameters = sum(p.numel() for p in plain.transformer.parameters())
    speedups = Speedups(fuse_qkv="on", quantize=quantize)  # type: ignore[arg-type]
    pipe, _ = prepare_pipeline(ModelSpec(cache_dir=model_cache, speedups=speedups))
    names = {name.rpartition(".")[2] for name, _ in pipe.transformer.named_modules()}
    assert not names & set(UNFUSED) and "to_qkv" in names
    if quantize == "none":
        assert sum(p.numel() for p in pipe.transformer.parameters()) == parameters


def offloaded_runner(offload: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FluxRunner:
    """diffusers' real offloading hooks, with the CPU as the execution device: sequential
    offload leaves the weights on the meta device between calls, as on a GPU."""
    monkeypatch.setattr(loading, "OFFLOAD_DEVICE_TYPES", ("cuda", "cpu"))
    spec = ModelSpec(cache_dir=cache_dir, device="cpu", offload=offload)  # type: ignore[arg-type]
    return create_flux_runner(spec)


def test_sequentially_offloaded_model_gets_its_preview_fit_and_a_live_tiny_vae(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = offloaded_runner("sequential", tmp_path, monkeypatch)
    assert any(param.is_meta for param in runner.pipe.vae.parameters())
    tiny = runner.decoders["tiny"]
    assert isinstance(tiny, AutoencoderPreviewDecoder)
    assert not any(param.is_meta for param in tiny.vae.parameters())


def test_model_offloaded_model_generates_with_every_preview_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = offloaded_runner("model", tmp_path, monkeypatch)
    for decoder in ("linear", "vae", "tiny"):
        events: list[object] = []
        job = Job("a fox", 64, 64, (1,), 2, 3.5, partial_images=1, preview_decoder=decoder)
        runner.run(job, events.append, lambda: False)
        assert any(isinstance(event, Preview) for event in events)


@pytest.mark.parametrize(
    "speedups", [Speedups(fuse_qkv="on"), Speedups(quantize="fp8")], ids=["fuse", "fp8"]
)
def test_weight_rewrites_with_sequential_offload_are_refused_before_loading(
    speedups: Speedups,
) -> None:
    spec = ModelSpec(model="/no/such/model", offload="sequential", speedups=speedups)
    with pytest.raises(ModelLoadError, match="--offload sequential cannot be combined"):
        create_flux_runner(spec)


def test_sequential_offload_turns_automatic_fusion_off() -> None:
    assert startup_speedups(ModelSpec(offload="sequential")).fuse_qkv == "off"
    assert startup_speedups(ModelSpec(offload="model")).fuse_qkv == "auto"


def cuda_with_fp8(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """A CUDA device as `apply_speedups` sees it, for its start-up checks only."""
    monkeypatch.setattr(speedups, "fp8_supported", lambda device: True)
    return torch.device("cuda")


def test_rowwise_fp8_on_cuda_refuses_a_dtype_other_than_bf16(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_pipeline(ModelSpec(cache_dir=model_cache, dtype="float16"))
    chosen = Speedups(compile="off", fuse_qkv="off", quantize="fp8")
    with pytest.raises(SpeedupError, match="needs --dtype bfloat16"):
        apply_speedups(pipe, chosen, cuda_with_fp8(monkeypatch), model_cache)


def test_uncompiled_fp8_on_cuda_warns_that_it_is_likely_slower(
    model_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = load_pipeline(ModelSpec(cache_dir=model_cache, dtype="bfloat16"))
    chosen = Speedups(compile="off", fuse_qkv="off", quantize="fp8")
    apply_speedups(pipe, chosen, cuda_with_fp8(monkeypatch), model_cache)
    assert "likely slower than bf16" in caplog.text
