"""Float8 linear layers with per-row scales, on `torch._scaled_mm`, for `--quantize fp8`.

Measured on an H100 (see ../shared/design.md and bench/RESULTS.md): torchao's float8
path ran at 520 ms per step uncompiled and did not finish compiling in minutes, while this
plain rowwise layer, regionally compiled, ran at 110 ms per step against 132 ms for bf16.
Weights are quantized once at load time; activations per call, per row (token).
`--quantize fp8-torchao` keeps torchao's path selectable, so that `bench/gpu.py` can
compare both on whatever torch is installed.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _rowwise(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D tensor to fp8; returns (values, float32 scales (rows, 1))."""
    scale = tensor.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8RowwiseLinear(nn.Module):
    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight, scale = _rowwise(linear.weight.detach())
        # _scaled_mm wants its second operand column-major: keep (out, in) row-major, use .t().
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        values, scale = _rowwise(rows)
        out = torch._scaled_mm(
            values,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=x.dtype,
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantizable(module: nn.Module) -> TypeGuard[nn.Linear]:
    """A linear layer whose dimensions are both divisible by 16, as fp8 matmuls need."""
    return (
        isinstance(module, nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def _is_adapter(name: str) -> bool:
    """A LoRA slot's own A and B layers (pipeline.loras) stay in the model's dtype: the
    low-rank branch runs unmerged beside the fp8 base layer it wraps."""
    return "lora_" in name


def _blocks(model: nn.Module, block_lists: tuple[str, ...]) -> list[nn.Module]:
    """Only the repeated transformer blocks are quantized: embeddings, norms and the final
    projection stay in the model's dtype, where precision matters most and time least."""
    return [block for list_name in block_lists for block in getattr(model, list_name)]


def quantize_blocks_fp8(model: nn.Module, block_lists: tuple[str, ...]) -> int:
    """Swap the linear layers inside the named block lists for fp8 ones; returns the count."""
    swapped = 0
    for block in _blocks(model, block_lists):
        for name, child in list(block.named_modules()):
            if quantizable(child) and not _is_adapter(name):
                parent_name, _, attribute = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attribute, Float8RowwiseLinear(child))
                swapped += 1
    return swapped


def quantize_blocks_torchao(model: nn.Module, block_lists: tuple[str, ...]) -> int:
    """The same layers through torchao's dynamic float8 (per-row scales), to compare with
    the plain layer above on the installed torch; raises ImportError without torchao."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    swapped = 0
    for block in _blocks(model, block_lists):
        swapped += sum(
            quantizable(module) and not _is_adapter(name) for name, module in block.named_modules()
        )
        quantize_(
            block,
            config,
            filter_fn=lambda module, name: quantizable(module) and not _is_adapter(name),
        )
    return swapped


def fp8_supported(device: torch.device) -> bool:
    """Hopper/Ada (compute capability 8.9+) have fp8 tensor cores; the CPU emulates them."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"
