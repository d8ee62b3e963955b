"""Small LoRA files for the embedded model's transformer, made in tests: random low-rank
weights in the diffusers/PEFT layout and in kohya's (sd-scripts) layout."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

# Layers of a double block and a single block that LoRA trainers target by default.
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
DOUBLE_BLOCK = (
    *ATTENTION,
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "norm1.linear",
)
SINGLE_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def transformer_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer, by module name."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def default_targets(blocks: int = 3, single_blocks: int = 3) -> list[str]:
    """The attention and MLP projections of every block, as ai-toolkit trains them."""
    double = [f"transformer_blocks.{i}.{layer}" for i in range(blocks) for layer in DOUBLE_BLOCK]
    single = [
        f"single_transformer_blocks.{i}.{layer}"
        for i in range(single_blocks)
        for layer in SINGLE_BLOCK
    ]
    return double + single


def random_pairs(
    shapes: Mapping[str, tuple[int, int]],
    targets: Iterable[str],
    rank: int,
    seed: int,
    strength: float = 0.5,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, A (rank, in) and B (out, rank) whose product changes the layer by about
    `strength` of a unit-variance weight."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in targets:
        in_features, out_features = shapes[name]
        a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, rank, generator=generator) * strength / rank**0.5
        pairs[name] = (a, b)
    return pairs


def save_peft_lora(
    path: Path,
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """diffusers' layout (`transformer.<layer>.lora_A.weight`), as ai-toolkit and
    `save_lora_weights` write it; with `alpha`, the TheLastBen-style `.alpha` keys."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in pairs.items():
        tensors[f"transformer.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = b.contiguous()
        if alpha is not None:
            tensors[f"transformer.{name}.alpha"] = torch.tensor(float(alpha))
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


# kohya names of the double-block layers whose diffusers layer is one linear.
KOHYA_DOUBLE = {
    "img_attn_proj": "attn.to_out.0",
    "img_mlp_0": "ff.net.0.proj",
    "img_mlp_2": "ff.net.2",
    "txt_attn_proj": "attn.to_add_out",
}


def save_kohya_lora(
    path: Path, shapes: Mapping[str, tuple[int, int]], rank: int, seed: int, alpha: float
) -> Path:
    """sd-scripts' FLUX layout (BFL's layer names, fused img QKV, `.alpha` per layer) on
    the double blocks; diffusers splits the QKV into to_q, to_k and to_v."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    blocks = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("transformer_blocks.")})
    for i in blocks:
        layers = {kohya: f"transformer_blocks.{i}.{ours}" for kohya, ours in KOHYA_DOUBLE.items()}
        for kohya, ours in layers.items():
            in_features, out_features = shapes[ours]
            _kohya_pair(
                tensors,
                f"lora_unet_double_blocks_{i}_{kohya}",
                in_features,
                out_features,
                rank,
                alpha,
                generator,
            )
        in_features, out_features = shapes[f"transformer_blocks.{i}.attn.to_q"]
        _kohya_pair(
            tensors,
            f"lora_unet_double_blocks_{i}_img_attn_qkv",
            in_features,
            3 * out_features,
            rank,
            alpha,
            generator,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _kohya_pair(
    tensors: dict[str, torch.Tensor],
    key: str,
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    generator: torch.Generator,
) -> None:
    tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) / (
        in_features**0.5
    )
    tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
    tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
