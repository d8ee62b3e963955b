"""What per-request LoRAs cost: step time with 0, 1 and 2 active LoRAs against the base
model, and the time to switch to a cached LoRA or to one read from disk.

The LoRAs are random, rank `--rank`, on the attention and MLP projections of every block
(what LoRA trainers target by default); step costs do not depend on the weights' values.
Rank 4 on the embedded model's width of 192 costs what rank 64 costs FLUX's 3072 (2 %).
A step is the time between two `Progress` events of one job, the median over the job's
steps, and configurations take turns over `--repeats` jobs keeping their fastest, so that
a busy machine slows them alike. "base" is a server started without `--lora-dir`; "0
LoRAs" one started with it, serving a request without LoRAs (the slot is switched off).
With `--fp8`, also the output difference (PSNR) of fp8 + LoRA against bf16 + the same
LoRA, beside that of fp8 alone against bf16.

    .venv/bin/python -m bench.lora [--size 256] [--steps 8] [--rank 4] [--repeats 3] [--fp8]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.factory import create_flux_runner
from pipeline.jobs import Job, LoraRef, Progress
from pipeline.loading import ModelSpec
from pipeline.loras import DOUBLE_BLOCK_PROJECTIONS, SINGLE_BLOCK_PROJECTIONS, LoraSpec
from pipeline.runner import FluxRunner
from pipeline.speedups import Speedups

TARGETS = DOUBLE_BLOCK_PROJECTIONS + SINGLE_BLOCK_PROJECTIONS


def random_lora(path: Path, transformer: torch.nn.Module, rank: int, seed: int) -> LoraRef:
    """A diffusers-format LoRA on every block's attention and MLP projections."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name and name.endswith(TARGETS):
            a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=generator) * 0.1 / rank**0.5
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
    save_file(tensors, str(path))
    info = path.stat()
    return LoraRef(path.name, str(path), 1.0, (info.st_size, info.st_mtime_ns))


def step_s(runner: FluxRunner, job: Job) -> float:
    """The median time between the job's step events."""
    times: list[float] = []

    def emit(event: object) -> None:
        if isinstance(event, Progress):
            times.append(time.perf_counter())

    runner.run(job, emit, lambda: False)
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def image(runner: FluxRunner, job: Job) -> np.ndarray:
    return np.asarray(runner.run(job, lambda event: None, lambda: False).images[0], np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = float(np.mean((a - b) ** 2))
    return float("inf") if error == 0 else float(10 * np.log10(255**2 / error))


def switch_ms(
    runner: FluxRunner, refs: tuple[LoraRef, ...], from_disk: bool, repeats: int
) -> float:
    """Median time to switch `refs` on and back off, without the denoising in between
    (on a GPU, until the copies are done)."""
    manager = runner._loras
    assert manager is not None
    times = []
    for _ in range(repeats):
        if from_disk:
            manager._cache.clear()
        started = time.perf_counter()
        with manager.applied(refs):
            pass
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp8", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        base = create_flux_runner(ModelSpec(cache_dir=cache))
        runner = create_flux_runner(ModelSpec(cache_dir=cache, loras=LoraSpec()))
        first, second = (
            random_lora(Path(folder) / f"lora-{i}.safetensors", base.pipe.transformer, args.rank, i)
            for i in (1, 2)
        )
        job = Job("a red circle", args.size, args.size, (1,), args.steps, 3.5)
        configs = {
            "base": (base, ()),
            "0 LoRAs": (runner, ()),
            "1 LoRA": (runner, (first,)),
            "2 LoRAs": (runner, (first, second)),
        }
        best: dict[str, float] = {}
        for round_ in range(args.repeats + 1):  # round 0 warms each configuration up
            for name, (model, loras) in configs.items():
                seconds = step_s(model, dataclasses.replace(job, loras=loras))
                if round_:
                    best[name] = min(best.get(name, seconds), seconds)
        print(f"step at {args.size}² ({args.steps} steps, rank {args.rank}, CPU):")
        for name, seconds in best.items():
            print(f"  {name:8} {seconds * 1000:7.1f} ms  {seconds / best['base']:.2f}x base")
        print("switching (on and back off, median):")
        for name, loras in (("1 LoRA", (first,)), ("2 LoRAs", (first, second))):
            cached = switch_ms(runner, loras, False, 20)
            disk = switch_ms(runner, loras, True, 5)
            print(f"  {name:8} cached {cached:6.1f} ms   from disk {disk:6.1f} ms")
        if args.fp8:
            fp8_difference(cache, job, first)


def fp8_difference(cache: Path, job: Job, lora: LoraRef) -> None:
    """PSNR of fp8 + LoRA against bf16 + LoRA, beside fp8 against bf16 without it."""
    bf16 = create_flux_runner(ModelSpec(cache_dir=cache, dtype="bfloat16", loras=LoraSpec()))
    fp8 = create_flux_runner(
        ModelSpec(
            cache_dir=cache, dtype="bfloat16", speedups=Speedups(quantize="fp8"), loras=LoraSpec()
        )
    )
    with_lora = dataclasses.replace(job, loras=(lora,))
    plain = (image(bf16, job), image(fp8, job))
    lora_images = (image(bf16, with_lora), image(fp8, with_lora))
    print("fp8 (rowwise, LoRA branch unmerged in bf16) against bf16, PSNR:")
    print(f"  without LoRA  {psnr(*plain):5.1f} dB")
    print(f"  with the LoRA {psnr(*lora_images):5.1f} dB")
    print(f"  (the LoRA itself moves the bf16 image to {psnr(plain[0], lora_images[0]):.1f} dB)")


if __name__ == "__main__":
    main()
