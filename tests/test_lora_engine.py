"""LoRAs on the model side with the embedded model: each job gets exactly its LoRAs at its
scales and the base model after it, in the uncompiled, compiled and fp8 paths."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from pipeline.factory import create_flux_runner, warmup_jobs
from pipeline.jobs import InvalidLora, Job, LoraRef
from pipeline.loading import (
    EMBEDDED,
    ModelLoadError,
    ModelSpec,
    load_pipeline,
    model_profile,
    startup_speedups,
)
from pipeline.lora_files import LoadedLora
from pipeline.loras import LoraBranches, LoraManager, LoraSlot, LoraSpec, LoraTarget
from pipeline.previews import LinearPreviewDecoder
from pipeline.runner import FluxRunner
from pipeline.speedups import Speedups, apply_speedups
from tests.images import psnr
from tests.loras import (
    ATTENTION,
    default_targets,
    random_pairs,
    save_kohya_lora,
    save_peft_lora,
    transformer_shapes,
)

# 128 px, the smallest size the embedded model was trained at: at 64 it paints the
# caption's colour over the whole picture, whatever the seed or the LoRA.
SIZE, STEPS = 128, 2


@pytest.fixture(scope="module")
def plain(model_cache: Path) -> FluxRunner:
    """A server started without --lora-dir."""
    return create_flux_runner(ModelSpec(cache_dir=model_cache))


@pytest.fixture(scope="module")
def runner(model_cache: Path) -> FluxRunner:
    return create_flux_runner(ModelSpec(cache_dir=model_cache, loras=LoraSpec(cache=8)))


@pytest.fixture(scope="module")
def shapes(plain: FluxRunner) -> dict[str, tuple[int, int]]:
    return transformer_shapes(plain.pipe.transformer)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, shapes: dict[str, tuple[int, int]]) -> Path:
    root = tmp_path_factory.mktemp("loras")
    attention = [f"transformer_blocks.{i}.{layer}" for i in range(3) for layer in ATTENTION]
    # Strong enough to move every picture clearly: the trained model shrugs off weaker noise.
    save_peft_lora(
        root / "a.safetensors", random_pairs(shapes, default_targets(), 4, seed=1, strength=1.0)
    )
    b = random_pairs(shapes, attention, 8, seed=2, strength=1.5)
    save_peft_lora(root / "b.safetensors", b, alpha=4)
    half = {name: (a, b * 0.5) for name, (a, b) in b.items()}
    save_peft_lora(root / "b-without-alpha.safetensors", half)
    save_peft_lora(root / "c.safetensors", random_pairs(shapes, default_targets(), 2, seed=3))
    save_kohya_lora(root / "kohya.safetensors", shapes, rank=4, seed=4, alpha=4)
    return root


def ref(folder: Path, name: str, scale: float = 1.0) -> LoraRef:
    info = (folder / name).stat()
    return LoraRef(name, str(folder / name), scale, (info.st_size, info.st_mtime_ns))


def generate(runner: FluxRunner, *loras: LoraRef, seed: int = 3) -> np.ndarray:
    job = Job("a red circle", SIZE, SIZE, (seed,), STEPS, 3.5, loras=loras)
    return np.asarray(runner.run(job, lambda event: None, lambda: False).images[0])


@pytest.fixture(scope="module")
def base(plain: FluxRunner) -> np.ndarray:
    return generate(plain)


def test_a_job_without_loras_is_the_base_model_byte_for_byte_also_after_a_lora_job(
    runner: FluxRunner, folder: Path, base: np.ndarray
) -> None:
    assert np.array_equal(generate(runner), base)
    assert not np.array_equal(generate(runner, ref(folder, "a.safetensors")), base)
    assert np.array_equal(generate(runner), base)


def test_scale_zero_gives_the_base_image_byte_for_byte(
    runner: FluxRunner, folder: Path, base: np.ndarray
) -> None:
    assert np.array_equal(generate(runner, ref(folder, "a.safetensors", 0.0)), base)


def test_one_and_two_loras_each_change_the_image_in_their_own_way(
    runner: FluxRunner, folder: Path, base: np.ndarray
) -> None:
    a, b = ref(folder, "a.safetensors"), ref(folder, "b.safetensors", -0.5)
    job = Job("a red circle", SIZE, SIZE, (3,), STEPS, 3.5, loras=(a, b))
    result = runner.run(job, lambda event: None, lambda: False)
    both = np.asarray(result.images[0])
    images = [base, generate(runner, a), generate(runner, b), both]
    for i, one in enumerate(images):
        for other in images[i + 1 :]:
            assert psnr(one, other) < 40
    assert [(lora.name, lora.scale) for lora in result.loras] == [(a.name, 1.0), (b.name, -0.5)]


def test_alphas_scale_a_lora_as_diffusers_reads_them(runner: FluxRunner, folder: Path) -> None:
    # alpha 4 at rank 8 halves the LoRA: the same as its B halved without an alpha.
    with_alpha = generate(runner, ref(folder, "b.safetensors"))
    assert np.array_equal(with_alpha, generate(runner, ref(folder, "b-without-alpha.safetensors")))


def test_a_kohya_file_loads_and_changes_the_image(
    runner: FluxRunner, folder: Path, base: np.ndarray
) -> None:
    assert psnr(generate(runner, ref(folder, "kohya.safetensors")), base) < 40


def test_the_cache_drops_the_least_recently_used_lora_and_reads_it_again(
    runner: FluxRunner, folder: Path
) -> None:
    branches = LoraBranches.of(runner.pipe.transformer)
    small = FluxRunner(
        runner.pipe, runner.profile, runner.decoders, loras=LoraManager(branches, LoraSpec(cache=2))
    )
    a, b, c = (ref(folder, f"{name}.safetensors") for name in "abc")
    first = generate(small, a)
    generate(small, b)
    generate(small, c)
    assert small.loaded_loras() == {b.file, c.file}
    assert np.array_equal(generate(small, a), first)
    assert small.loaded_loras() == {c.file, a.file}


def test_a_lora_file_replaced_on_disk_is_read_again(
    runner: FluxRunner, folder: Path, tmp_path: Path
) -> None:
    moving = tmp_path / "moving.safetensors"
    shutil.copy(folder / "a.safetensors", moving)
    before = generate(runner, ref(tmp_path, moving.name))
    shutil.copy(folder / "c.safetensors", moving)
    os.utime(moving, ns=(1, 1))  # a new version even where the clock is coarse
    after = generate(runner, ref(tmp_path, moving.name))
    assert np.array_equal(after, generate(runner, ref(folder, "c.safetensors")))
    assert not np.array_equal(before, after)


def _bad_files(root: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Files that pass the HTTP side's checks and fail only when loaded; name -> reason."""
    to_q = "transformer_blocks.0.attn.to_q"
    a, b = random_pairs(shapes, [to_q], 4, seed=9)[to_q]
    cases = {}
    header = save_peft_lora(root / "corrupt.safetensors", {to_q: (a, b)})
    data = bytearray(header.read_bytes())
    length = int.from_bytes(data[:8], "little")
    data[8 : 8 + length] = data[8 : 8 + length].replace(b'"F32"', b'"F64"', 1)
    header.write_bytes(bytes(data))
    cases["corrupt"] = "not a valid safetensors file"
    save_peft_lora(
        root / "other-model.safetensors", {to_q: (torch.randn(4, 3072), torch.randn(3072, 4))}
    )
    cases["other-model"] = "does not fit this model"
    save_peft_lora(root / "more-blocks.safetensors", {"transformer_blocks.7.attn.to_q": (a, b)})
    cases["more-blocks"] = "a layer this model does not have"
    save_peft_lora(root / "not-finite.safetensors", {to_q: (a, b * float("nan"))})
    cases["not-finite"] = "not finite"
    dora = {"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(192)}
    save_peft_lora(root / "dora.safetensors", {to_q: (a, b)}, extra=dora)
    cases["dora"] = "DoRA"
    norm = {"transformer.transformer_blocks.0.attn.norm_q.weight": torch.ones(32)}
    save_peft_lora(root / "control.safetensors", {to_q: (a, b)}, extra=norm)
    cases["control"] = "Control LoRA"
    clip = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    save_file(
        {f"{clip}.lora_A.weight": torch.zeros(4, 32), f"{clip}.lora_B.weight": torch.zeros(32, 4)},
        str(root / "text-encoder-only.safetensors"),
    )
    cases["text-encoder-only"] = "no LoRA weights for a FLUX transformer"
    save_file({"model.layer.weight": torch.zeros(4, 4)}, str(root / "not-a-lora.safetensors"))
    cases["not-a-lora"] = "no LoRA weights for a FLUX transformer"
    # sd-scripts' single-block QKV+MLP layer, which diffusers splits at FLUX's own widths.
    linear1 = "lora_unet_single_blocks_0_linear1"
    kohya = {f"{linear1}.lora_down.weight": a, f"{linear1}.lora_up.weight": torch.zeros(1344, 4)}
    save_file(kohya, str(root / "unconvertible.safetensors"))
    cases["unconvertible"] = "is not in a FLUX LoRA format this server reads"
    return cases


BAD = [
    "corrupt",
    "other-model",
    "more-blocks",
    "not-finite",
    "dora",
    "control",
    "text-encoder-only",
    "not-a-lora",
    "unconvertible",
]


@pytest.fixture(scope="module")
def bad_folder(
    tmp_path_factory: pytest.TempPathFactory, shapes: dict[str, tuple[int, int]]
) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad-loras")
    return root, _bad_files(root, shapes)


@pytest.mark.parametrize("name", BAD)
def test_a_lora_that_only_loading_shows_bad_is_refused_and_the_next_job_is_unaffected(
    runner: FluxRunner,
    folder: Path,
    bad_folder: tuple[Path, dict[str, str]],
    base: np.ndarray,
    name: str,
) -> None:
    root, reasons = bad_folder
    good = ref(folder, "a.safetensors")
    with pytest.raises(InvalidLora, match=reasons[name]) as raised:
        generate(runner, good, ref(root, f"{name}.safetensors"))
    assert f"'{name}.safetensors'" in str(raised.value) and str(root) not in str(raised.value)
    assert np.array_equal(generate(runner), base)


def test_a_lora_s_text_encoder_part_is_reported_as_not_applied(
    runner: FluxRunner, folder: Path, shapes: dict[str, tuple[int, int]], tmp_path: Path
) -> None:
    clip = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    extra = {
        f"{clip}.lora_A.weight": torch.zeros(4, 32),
        f"{clip}.lora_B.weight": torch.zeros(32, 4),
    }
    pairs = random_pairs(shapes, default_targets(), 4, seed=1)
    save_peft_lora(tmp_path / "with-clip.safetensors", pairs, extra=extra)
    job = Job("x", SIZE, SIZE, (3,), STEPS, 3.5, loras=(ref(tmp_path, "with-clip.safetensors"),))
    (applied,) = runner.run(job, lambda event: None, lambda: False).loras
    assert applied.not_applied == ("text_encoder",)


def _transformer_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 64, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }


@pytest.mark.parametrize("kind", ["uncompiled", "compiled"])
def test_every_layer_a_lora_may_target_changes_the_transformer_output(
    runner: FluxRunner, shapes: dict[str, tuple[int, int]], model_cache: Path, kind: str
) -> None:
    # The fused-QKV trap: a LoRA on a projection that attention no longer calls would load
    # without error and change nothing. Every linear layer of the model is checked, with
    # the LoRA term of each path (the compiled path's slot, here uncompiled).
    target: LoraTarget
    if kind == "uncompiled":
        transformer = runner.pipe.transformer
        target = LoraBranches.of(transformer)
    else:
        pipe = load_pipeline(ModelSpec(cache_dir=model_cache))
        LoraSlot.inject(pipe, rank=2)
        transformer = pipe.transformer
        target = LoraSlot.of(transformer)
    slot = target
    inputs = _transformer_inputs()
    with torch.no_grad():
        base = transformer(**inputs).sample
        unchanged = []
        for name, (a, b) in random_pairs(shapes, shapes, 2, seed=5).items():
            slot.activate([(name, LoadedLora({name: (a, b)}), 1.0)])
            try:
                changed = transformer(**inputs).sample
            finally:
                slot.deactivate()
            if torch.equal(changed, base):
                unchanged.append(name)
        assert torch.equal(transformer(**inputs).sample, base)
    assert len(shapes) > 60 and unchanged == []


def test_loras_never_run_on_fused_qkv_or_sequential_offload() -> None:
    loras = LoraSpec()
    assert startup_speedups(ModelSpec(loras=loras)).fuse_qkv == "off"  # auto would fuse on CUDA
    with pytest.raises(ModelLoadError, match="--fuse-qkv on cannot be combined with --lora-dir"):
        startup_speedups(ModelSpec(loras=loras, speedups=Speedups(fuse_qkv="on")))
    with pytest.raises(ModelLoadError, match="--offload sequential cannot be combined"):
        startup_speedups(ModelSpec(loras=loras, offload="sequential"))


@pytest.fixture(scope="module")
def compiled(model_cache: Path) -> Iterator[FluxRunner]:
    """The embedded model with one double and one single random block (each block type is
    compiled once, whatever the count), its LoRA slot of rank 8 prepared as start-up
    does, regionally compiled with the eager backend (dynamo's capture without inductor)."""
    torch._dynamo.reset()
    pipe = load_pipeline(ModelSpec(cache_dir=model_cache))
    config = {**pipe.transformer.config, "num_layers": 1, "num_single_layers": 1}
    pipe.transformer = FluxTransformer2DModel.from_config(config)
    LoraSlot.inject(pipe, rank=8)
    speedups = Speedups(compile="on", compile_backend="eager")
    applied = apply_speedups(pipe, speedups, torch.device("cpu"), model_cache)
    profile = dataclasses.replace(
        model_profile(EMBEDDED, pipe, applied), default_steps=2, loras=True, lora_max_rank=8
    )
    manager = LoraManager(LoraSlot.of(pipe.transformer), LoraSpec(max_rank=8))
    decoder = LinearPreviewDecoder(weight=torch.zeros(3, 16), bias=torch.zeros(3))
    yield FluxRunner(pipe, profile, {"linear": decoder}, loras=manager)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def mini_folder(tmp_path_factory: pytest.TempPathFactory, compiled: FluxRunner) -> Path:
    """LoRAs of ranks 4, 8 (attention only) and 2, and a kohya one, for the one-block model."""
    root = tmp_path_factory.mktemp("mini-loras")
    shapes = transformer_shapes(compiled.pipe.transformer)
    shapes = {name.replace(".base_layer", ""): shape for name, shape in shapes.items()}
    every = default_targets(blocks=1, single_blocks=1)
    attention = [f"transformer_blocks.0.{layer}" for layer in ATTENTION]
    for name, targets, rank in (("a", every, 4), ("b", attention, 8), ("c", every, 2)):
        # Strong: the random blocks' images move little under small changes.
        pairs = random_pairs(shapes, targets, rank, seed=rank, strength=2.0)
        save_peft_lora(root / f"{name}.safetensors", pairs)
    save_kohya_lora(root / "kohya.safetensors", shapes, rank=4, seed=4, alpha=2)
    return root


def test_switching_loras_on_a_compiled_model_compiles_nothing_after_the_warm_up(
    compiled: FluxRunner, mini_folder: Path
) -> None:
    a, b, c, kohya = (ref(mini_folder, f"{n}.safetensors") for n in ("a", "b", "c", "kohya"))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for job in warmup_jobs(compiled.profile, (SIZE, SIZE)):
            compiled.run(job, lambda event: None, lambda: False)
        graphs_after_warm_up = counters["stats"]["unique_graphs"]
        base = generate(compiled)
        images = [generate(compiled, *loras) for loras in [(a,), (b,), (a, c), (kohya,)]]
        assert np.array_equal(generate(compiled), base)
        assert np.array_equal(generate(compiled, dataclasses.replace(a, scale=0)), base)
        cached = Job("x", SIZE, SIZE, (1, 2), STEPS, 3.5, acceleration="high", loras=(a, c))
        assert len(compiled.run(cached, lambda event: None, lambda: False).images) == 2
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up
    assert all(psnr(image, base) < 40 for image in images[:3])
    assert not np.array_equal(images[3], base)
    assert psnr(images[0], images[2]) < 40


def test_a_compiled_slot_refuses_loras_past_its_rank_and_the_next_job_is_unaffected(
    compiled: FluxRunner, mini_folder: Path
) -> None:
    before = generate(compiled)
    a, b = ref(mini_folder, "a.safetensors"), ref(mini_folder, "b.safetensors")
    with pytest.raises(InvalidLora, match=r"add up to rank 12 .* holds rank 8 \(--lora-max-rank\)"):
        generate(compiled, a, b)
    assert np.array_equal(generate(compiled), before)


def test_fp8_applies_loras_beside_its_float8_layers(
    model_cache: Path, runner: FluxRunner, folder: Path, base: np.ndarray
) -> None:
    fp8 = Speedups(quantize="fp8")
    plain_fp8 = generate(create_flux_runner(ModelSpec(cache_dir=model_cache, speedups=fp8)))
    lora_fp8 = create_flux_runner(ModelSpec(cache_dir=model_cache, speedups=fp8, loras=LoraSpec()))
    a = ref(folder, "a.safetensors")
    assert np.array_equal(generate(lora_fp8), plain_fp8)
    with_lora = generate(lora_fp8, a)
    # The LoRA moves the fp8 image as it moves the float one: fp8 + LoRA is as close to
    # float + LoRA as fp8 alone is to float.
    assert psnr(with_lora, plain_fp8) < 30
    assert psnr(with_lora, generate(runner, a)) > min(30.0, psnr(plain_fp8, base) - 3)
