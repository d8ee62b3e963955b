"""Start-up speed-ups of the loaded pipeline: fused QKV, fp8, channels-last VAE, compile.

Each switch is `auto`, on or off. `auto` turns on what measured faster on CUDA (see
bench/RESULTS.md) and leaves the CPU path plain. A switch that cannot work on the chosen
device is refused with a `SpeedupError` that says why, never silently ignored.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import FluxPipeline

from pipeline.fp8 import fp8_supported, quantize_blocks_fp8, quantize_blocks_torchao

logger = logging.getLogger(__name__)

Switch = Literal["auto", "on", "off"]
Quantize = Literal["none", "fp8", "fp8-torchao"]
REPEATED_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


class SpeedupError(Exception):
    """A requested speed-up cannot be applied here; the message says why in one line."""


@dataclass(frozen=True)
class Speedups:
    compile: Switch = "auto"
    compile_backend: str = "inductor"
    fuse_qkv: Switch = "auto"
    quantize: Quantize = "none"
    attention_backend: str | None = None

    def compiles(self, device: torch.device) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")

    def fuses(self, device: torch.device) -> bool:
        return self.fuse_qkv == "on" or (self.fuse_qkv == "auto" and device.type == "cuda")


def apply_speedups(
    pipe: FluxPipeline, speedups: Speedups, device: torch.device, cache_dir: Path
) -> tuple[str, ...]:
    """Apply `speedups` to `pipe` in place; returns a description of what was applied."""
    applied: list[str] = []
    transformer = pipe.transformer
    if speedups.fuses(device):
        transformer.fuse_qkv_projections()
        applied.append("fused-qkv")
    if speedups.quantize != "none":
        applied.append(_quantize(transformer, speedups.quantize, device))
    if device.type == "cuda":
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels-last-vae")
    if speedups.attention_backend:
        try:
            transformer.set_attention_backend(speedups.attention_backend)
        except (ValueError, RuntimeError) as error:
            raise SpeedupError(
                f"attention backend {speedups.attention_backend!r} is not usable here: {error}"
            ) from None
        applied.append(f"attention={speedups.attention_backend}")
    if speedups.compiles(device):
        _persist_compile_cache(cache_dir)
        # Not fullgraph: the first-block cache (`acceleration`) hooks the blocks with a
        # decision dynamo must not trace; without the cache the graphs are whole anyway.
        # Dynamic: one graph serves every image size (token count) and, once warmed with
        # two images, every batch size, so no request at another size compiles.
        transformer.compile_repeated_blocks(
            fullgraph=False, dynamic=True, backend=speedups.compile_backend
        )
        applied.append(f"regional-compile({speedups.compile_backend})")
    logger.info("speed-ups: %s", ", ".join(applied) or "none")
    return tuple(applied)


def _quantize(transformer: torch.nn.Module, quantize: Quantize, device: torch.device) -> str:
    """Swap the repeated blocks' linears for fp8 ones; returns what was done.

    A GPU without fp8 tensor cores (an A100, say) keeps serving in bf16 rather than
    refusing to start: the log and `/health`'s speed-ups say so.
    """
    if not fp8_supported(device):
        logger.warning("--quantize %s: %s has no fp8 matmuls; serving in bf16", quantize, device)
        return "no-fp8-on-this-gpu(bf16)"
    if quantize == "fp8-torchao":
        if device.type != "cuda":
            raise SpeedupError(
                "--quantize fp8-torchao runs torchao's float8 kernels, which need a CUDA GPU "
                "with compute capability 8.9+; use --quantize fp8 on the CPU"
            )
        try:
            count = quantize_blocks_torchao(transformer, REPEATED_BLOCKS)
        except ImportError:
            raise SpeedupError(
                "--quantize fp8-torchao needs the torchao package: pip install torchao"
            ) from None
        return f"fp8-torchao({count} linears)"
    return f"fp8-rowwise({quantize_blocks_fp8(transformer, REPEATED_BLOCKS)} linears)"


def _persist_compile_cache(cache_dir: Path) -> None:
    """Keep inductor's and Triton's caches next to the model cache, so restarts reuse them."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
