"""A LoRA file as the model side reads it: checked, converted and scaled, never unpickled.

diffusers reads the formats (`FluxLoraLoaderMixin.lora_state_dict`: diffusers/PEFT, kohya,
ai-toolkit, XLabs, the hosted trainers' files) and builds the `LoraConfig` whose ranks and
alphas give each layer's scaling, as `load_lora_weights` would; this module then checks
every layer against the model and folds the scaling into B, so that applying a LoRA (see
`pipeline.loras`) is one low-rank product per layer. Anything it cannot apply faithfully
(DoRA, LoKr, biases, Control LoRAs that overwrite norms, a layer the model lacks or of
another width) is an `InvalidLora` that names the LoRA as the request did. Text-encoder
parts are not applied and are reported as such (`LoadedLora.not_applied`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors

from pipeline.jobs import InvalidLora, LoraRef

logger = logging.getLogger(__name__)

TRANSFORMER = "transformer."
# Keys of text encoders in the formats diffusers reads; none of them is applied here.
TEXT_ENCODER_KEYS = {
    "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_", "text_encoders.clip_l."),
    "text_encoder_2": ("text_encoder_2.", "lora_te2_", "text_encoders.t5xxl."),
}
# Flux Control LoRAs overwrite these norms in the base model: not undone after a job.
NORM_KEYS = FluxLoraLoaderMixin._control_lora_supported_norm_keys


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA ready to apply: per layer name, A (rank, in) and B (out, rank) with the
    LoRA's own scaling folded into B, in the model's dtype and on its device."""

    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    not_applied: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.layers.values()), default=0)


def read_lora(
    ref: LoraRef,
    shapes: Mapping[str, tuple[int, int]],
    *,
    max_bytes: int,
    dtype: torch.dtype,
    device: torch.device,
) -> LoadedLora:
    """Read `ref.file` and check it against the model's linear layers (name -> (in, out));
    raises `InvalidLora` with a sentence that names the LoRA as the request did."""
    raw, metadata = _safetensors(ref, max_bytes)
    keys = list(raw)
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys):
        raise _invalid(ref, "is a DoRA, which this server does not apply")
    if any("lokr_" in k or "hada_" in k for k in keys):
        raise _invalid(ref, "is a LoKr or LoHa, not a LoRA")
    ignored = [part for part, prefixes in TEXT_ENCODER_KEYS.items() if _has(keys, prefixes)]
    try:
        state_dict, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(raw), return_alphas=True)
    except Exception as error:  # an untrusted file: any failure to convert is the file's
        logger.info("LoRA %s: diffusers could not convert it: %r", ref.name, error)
        raise _invalid(ref, "is not in a FLUX LoRA format this server reads") from None
    if any(k.startswith(TRANSFORMER) and any(n in k for n in NORM_KEYS) for k in state_dict):
        raise _invalid(ref, "is a FLUX Control LoRA, which replaces layers; not supported")
    weights = {
        k.removeprefix(TRANSFORMER): v
        for k, v in state_dict.items()
        if k.startswith(TRANSFORMER) and "lora" in k
    }
    if not weights:
        raise _invalid(ref, "holds no LoRA weights for a FLUX transformer")
    if "lora_A" not in next(iter(weights)):
        weights = convert_unet_state_dict_to_peft(weights)
    config = _config(ref, weights, alphas, metadata)
    layers = {}
    for name in sorted({key.split(".lora_")[0] for key in weights}):
        a, b = weights.get(f"{name}.lora_A.weight"), weights.get(f"{name}.lora_B.weight")
        if name not in shapes:
            raise _invalid(ref, f"targets a layer this model does not have ({name})")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2:
            raise _invalid(ref, f"has an incomplete layer ({name})")
        in_features, out_features = shapes[name]
        if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
            raise _invalid(
                ref,
                f"does not fit this model: its layer {name} maps {a.shape[1]} to {b.shape[0]} "
                f"features, the model's {in_features} to {out_features}",
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise _invalid(ref, f"has weights that are not finite numbers ({name})")
        scaling = _scaling(config, name)
        layers[name] = (
            a.to(device=device, dtype=dtype),
            (b.float() * scaling).to(device=device, dtype=dtype),
        )
    return LoadedLora(layers=layers, not_applied=tuple(ignored))


def _safetensors(ref: LoraRef, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors and diffusers' LoRA metadata. Read without following a symbolic
    link in its last part (the HTTP side checked the path that reaches it), at most
    `max_bytes`, and parsed by safetensors alone: never unpickled."""
    try:
        descriptor = os.open(ref.file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError:
        raise _invalid(ref, "could not be read") from None
    if len(data) > max_bytes:
        raise _invalid(ref, f"is larger than the server's limit of {max_bytes} bytes")
    try:
        tensors = load_safetensors(data)
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
    except Exception:  # safetensors raises its own error type for any damage
        raise _invalid(ref, "is not a valid safetensors file") from None
    text = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    try:
        metadata = json.loads(text) if text else {}
    except ValueError:
        metadata = {}
    return tensors, metadata if isinstance(metadata, dict) else {}


def _config(
    ref: LoraRef, weights: dict[str, torch.Tensor], alphas: Any, metadata: dict[str, Any]
) -> Any:
    """The `LoraConfig` diffusers would build for the transformer part (ranks, alphas)."""
    ranks = {f"^{k}": v.shape[1] for k, v in weights.items() if "lora_B" in k and v.ndim > 1}
    mine = {
        k.removeprefix(TRANSFORMER): v for k, v in metadata.items() if k.startswith(TRANSFORMER)
    }
    network_alphas = {
        k.removeprefix(TRANSFORMER): v
        for k, v in (alphas or {}).items()
        if k.startswith(TRANSFORMER)
    }
    try:
        config = _create_lora_config(weights, None if mine else network_alphas, mine or None, ranks)
    except Exception:
        raise _invalid(ref, "has LoRA settings this server cannot read") from None
    if config.use_dora:
        raise _invalid(ref, "is a DoRA, which this server does not apply")
    if config.lora_bias:
        raise _invalid(ref, "has LoRA biases, which this server does not apply")
    return config


def _scaling(config: Any, name: str) -> float:
    """peft's scaling of layer `name`: its alpha over its rank (square root with rsLoRA)."""
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    alpha = config.alpha_pattern.get(
        get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha
    )
    return float(alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)


def _has(keys: Sequence[str], prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefixes) for key in keys)


def _invalid(ref: LoraRef, what: str) -> InvalidLora:
    return InvalidLora(f"the LoRA {ref.name!r} {what}")
