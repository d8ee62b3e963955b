"""Start-up speed-ups of the loaded pipeline: fused QKV, fp8, compile.

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
from diffusers.models.attention import AttentionModuleMixin

from pipeline.fp8 import fp8_supported, quantize_blocks_fp8, quantize_blocks_torchao

logger = logging.getLogger(__name__)

Switch = Literal["auto", "on", "off"]
Quantize = Literal["none", "fp8", "fp8-torchao"]
REPEATED_BLOCKS = ("transformer_blocks", "single_transformer_blocks")
UNFUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


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
        fuse_qkv(transformer)
        applied.append("fused-qkv")
    if speedups.quantize != "none":
        applied.append(_quantize(transformer, speedups, device))
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
        compile_blocks(transformer, speedups.compile_backend)
        applied.append(f"regional-compile({speedups.compile_backend})")
    logger.info("speed-ups: %s", ", ".join(applied) or "none")
    return tuple(applied)


def compile_blocks(transformer: torch.nn.Module, backend: str) -> None:
    """Regional compile of each repeated block's own `forward`, not of its `__call__`.

    diffusers' `compile_repeated_blocks` compiles `__call__`, which runs whatever
    `forward` is at call time: once the first-block cache (`acceleration`) replaces every
    block's `forward` with its shared wrapper, dynamo traces that wrapper too and needs a
    version per block position, batch size and skip/compute case, past its recompile
    limit (8). Compiling the bound `forward` before any hook wraps it leaves the hooks
    eager around compiled blocks, so the cache adds no graphs. Dynamic: one graph per block
    type serves every image size (token count) and, once warmed with two images, every
    batch size. Not fullgraph, so that an attention backend dynamo cannot trace breaks
    the graph instead of the request.
    """
    for list_name in REPEATED_BLOCKS:
        for block in getattr(transformer, list_name):
            block.forward = torch.compile(block.forward, dynamic=True, backend=backend)


def fuse_qkv(transformer: torch.nn.Module) -> None:
    """One matmul for Q, K and V (and for the text stream's added Q, K and V), without
    the separate projections: diffusers' `fuse_qkv_projections` keeps them (about 4.3 GB
    in bf16 on FLUX.1, unused once fused), and fp8 would quantize them too. Fusing one
    attention at a time keeps the transient to one layer's weights."""
    for module in transformer.modules():
        if isinstance(module, AttentionModuleMixin) and module._supports_qkv_fusion:
            module.fuse_projections()
            for name in UNFUSED_PROJECTIONS:
                if hasattr(module, name):
                    delattr(module, name)


def _quantize(transformer: torch.nn.Module, speedups: Speedups, device: torch.device) -> str:
    """Swap the repeated blocks' linears for fp8 ones; returns what was done.

    A GPU without fp8 tensor cores (an A100, say) keeps serving in bf16 rather than
    refusing to start: the log and `/health`'s speed-ups say so.
    """
    quantize = speedups.quantize
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
    _check_rowwise_dtype(transformer, device)
    if not speedups.compiles(device):
        logger.warning(
            "--quantize fp8 without --compile: each linear quantizes its input in separate "
            "eager kernels, which is likely slower than bf16 on a GPU; fp8 pays off compiled"
        )
    return f"fp8-rowwise({quantize_blocks_fp8(transformer, REPEATED_BLOCKS)} linears)"


def _check_rowwise_dtype(transformer: torch.nn.Module, device: torch.device) -> None:
    """CUDA's rowwise-scaled `_scaled_mm` writes bf16 only (torch's CUTLASS kernel refuses
    any other output type; only cuBLAS on sm90 with CUDA 12.9+ adds float32), so a model in
    another dtype would fail at its first linear: refuse it at start-up instead."""
    if device.type == "cuda" and transformer.dtype != torch.bfloat16:
        raise SpeedupError(
            f"--quantize fp8 on CUDA needs --dtype bfloat16 (torch's rowwise fp8 matmul "
            f"writes bf16 only); the model is loaded as {transformer.dtype}"
        )


def _persist_compile_cache(cache_dir: Path) -> None:
    """Keep inductor's and Triton's caches next to the model cache, so restarts reuse them."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
