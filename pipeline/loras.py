"""Per-request LoRAs on the loaded transformer: an LRU cache of read LoRAs, switched on for
one job at a time with the job's scales, and the base model restored after it.

A job's LoRAs become one low-rank term per layer: each LoRA's scaling (see
`pipeline.lora_files`) and the request's scale are folded into its B matrices, and the
LoRAs of a job are concatenated along the rank, so one product serves any number of them.
Two ways to add that term, by whether the model is compiled:

- Uncompiled (`LoraBranches`): for the job's duration, each layer a LoRA targets gets a
  forward that adds the term to the layer's own output (two kernels: x·Aᵀ, then an addmm
  with Bᵀ); the layers are the model's own, float or fp8, and are not touched between
  jobs, so a job without LoRAs computes exactly what a server without `--lora-dir` does.
  peft's unmerged `lora.Linear` costs four kernels per layer plus its checks (one rank-4
  LoRA on the embedded model on CPU: 1.18x the base step, against 1.09x here; see
  bench/RESULTS.md), and cannot wrap our rowwise float8 layer.
- Compiled (`LoraSlot`): a compiled graph must never meet a new module or shape, so one
  PEFT adapter, the slot, wraps every linear layer at start-up, with a fixed rank
  (`--lora-max-rank`), through diffusers' own hot-swap preparation
  (`enable_lora_hotswap(target_rank=...)`, then `load_lora_weights` of a blank LoRA), after
  placing the model and before fp8 and compile (so fp8 quantizes the slot's base layers,
  and the LoRA term runs unmerged beside them). A job's LoRAs are copied into the slot in
  place, zero-padded, as peft's hot-swap does, and every layer of the slot is switched on;
  without LoRAs the slot is off and each layer calls its base layer alone. Switching LoRAs
  therefore compiles nothing: each block's graphs come in two variants, slot on and slot
  off, all made by the warm-up. Every linear layer is in the slot, so a LoRA fits whatever
  layers it targets, as long as the ranks of a job's LoRAs add up to at most the slot's.

Not diffusers' `load_lora_weights(..., hotswap=True)` per job: it converts the file again
at each swap, refuses a LoRA whose alphas differ from the first one's (`alpha_pattern`),
swaps one adapter where a request may name several, and rejects layers the first LoRA did
not target.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers import FluxPipeline
from peft.tuners.lora import LoraLayer
from torch import nn

from pipeline.fp8 import Float8RowwiseLinear
from pipeline.jobs import AppliedLora, InvalidLora, LoraRef
from pipeline.lora_files import TRANSFORMER, LoadedLora, read_lora

logger = logging.getLogger(__name__)

SLOT = "fluxstream"
# The projections a FLUX LoRA usually targets (ai-toolkit's set): attention and MLP of
# every double block (image and text streams) and of every single block.
DOUBLE_BLOCK_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
SINGLE_BLOCK_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
# The warm-up's LoRA: the slot switched on with zeros (see `pipeline.factory.warmup_jobs`).
BLANK = LoraRef(name="warm-up", file="")
# A layer's share of a job: per LoRA that targets it, (A, B) and the request's scale.
Parts = list[tuple[tuple[torch.Tensor, torch.Tensor], float]]
Active = Sequence[tuple[str, LoadedLora, float]]


@dataclass(frozen=True)
class LoraSpec:
    """`cache`: LoRAs kept loaded; `max_rank`: the compiled slot's rank; `max_bytes`: the
    largest file read."""

    cache: int = 4
    max_rank: int = 64
    max_bytes: int = 2 * 2**30


class LoraTarget(Protocol):
    """Where a job's LoRAs go: `shapes` (layer name -> (in, out)) to check files against,
    the `dtype` and `device` to keep them in, and `rank`, the most one job may add up to
    on a layer (None: any)."""

    @property
    def rank(self) -> int | None: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def shapes(self) -> dict[str, tuple[int, int]]: ...

    def activate(self, loras: Active) -> None: ...

    def deactivate(self) -> None: ...


def _parts(layers: Mapping[str, Any], loras: Active) -> dict[str, Parts]:
    return {
        layer: [(lora.layers[layer], scale) for _, lora, scale in loras if layer in lora.layers]
        for layer in layers
    }


def _shapes(layers: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Layer name -> (in, out) features, what a LoRA file is checked against."""
    return {name: (m.in_features, m.out_features) for name, m in layers.items()}


def _scaled(b: torch.Tensor, scale: float) -> torch.Tensor:
    return b if scale == 1 else b * scale


class LoraBranches:
    """Uncompiled: the job's LoRA term patched over the forward of the layers it targets,
    for the job only."""

    rank = None

    def __init__(self, layers: Mapping[str, nn.Module], dtype: torch.dtype, device: torch.device):
        self._layers: dict[str, Any] = dict(layers)
        self.dtype, self.device = dtype, device
        self._patched: dict[nn.Module, Any] = {}

    @classmethod
    def of(cls, transformer: nn.Module) -> LoraBranches:
        layers = {
            name: module
            for name, module in transformer.named_modules()
            if isinstance(module, nn.Linear | Float8RowwiseLinear)
        }
        # The compute dtype, not fp8's: a float parameter no quantization touches.
        weight = next(p for p in transformer.parameters() if p.dtype.itemsize >= 2)
        return cls(layers, weight.dtype, weight.device)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return _shapes(self._layers)

    def activate(self, loras: Active) -> None:
        for layer, pairs in _parts(self._layers, loras).items():
            if not pairs:
                continue
            a = torch.cat([a for (a, _), _ in pairs])
            b = torch.cat([_scaled(b, scale) for (_, b), scale in pairs], dim=1)
            module = self._layers[layer]
            self._patched[module] = module.__dict__.get("forward")
            module.forward = _plus_low_rank(module.forward, a, b)

    def deactivate(self) -> None:
        for module, own in self._patched.items():
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._patched.clear()


def _plus_low_rank(
    forward: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor
) -> Callable[..., torch.Tensor]:
    """`forward` plus (x·Aᵀ)·Bᵀ, in two kernels. With model offload the layer runs on the
    GPU while the LoRA waits on the CPU: it follows the input once per job."""
    on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {a.device: (a, b.t())}

    def patched(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = forward(x, *args, **kwargs)
        if x.device not in on:
            on[x.device] = (a.to(x.device), b.t().to(x.device))
        down, up = on[x.device]
        low = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(down.dtype), down)
        flat = out.reshape(-1, out.shape[-1])
        return torch.addmm(flat, low.to(flat.dtype), up.to(flat.dtype)).view(out.shape)

    return patched


class LoraSlot:
    """Compiled: the slot adapter of fixed `rank` in every linear layer."""

    def __init__(self, layers: Mapping[str, Any], rank: int) -> None:
        self._layers: dict[str, Any] = dict(layers)
        self.rank: int | None = rank
        self._on = False
        self._dirty: set[str] = set()
        first = next(iter(self._layers.values())).lora_A[SLOT].weight
        self.dtype, self.device = first.dtype, first.device

    @classmethod
    def inject(cls, pipe: FluxPipeline, rank: int) -> None:
        """Wrap every linear layer of `pipe.transformer` in the slot, switched off. Call it
        after placing the model, before quantizing or compiling it."""
        transformer = pipe.transformer
        weight = next(transformer.parameters())
        like: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        blank = {}
        for name, module in transformer.named_modules():
            if isinstance(module, nn.Linear):
                a, b = f"{TRANSFORMER}{name}.lora_A.weight", f"{TRANSFORMER}{name}.lora_B.weight"
                blank[a] = torch.zeros(rank, module.in_features, **like)
                blank[b] = torch.zeros(module.out_features, rank, **like)
        transformer.enable_lora_hotswap(target_rank=rank)
        pipe.load_lora_weights(blank, adapter_name=SLOT)
        transformer.disable_adapters()

    @classmethod
    def of(cls, transformer: nn.Module) -> LoraSlot:
        layers = {
            name: module
            for name, module in transformer.named_modules()
            if isinstance(module, LoraLayer) and SLOT in module.lora_A
        }
        if not layers:
            raise ValueError("the transformer has no LoRA slot (see LoraSlot.inject)")
        first: Any = next(iter(layers.values()))
        return cls(layers, int(first.lora_A[SLOT].weight.shape[0]))

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return _shapes(self._layers)

    def activate(self, loras: Active) -> None:
        """Copy the job's LoRAs into the slot and switch it on; raises `InvalidLora`,
        changing nothing, when their ranks add up to more than the slot holds."""
        parts = _parts(self._layers, loras)
        for layer, pairs in parts.items():
            total = sum(a.shape[0] for (a, _), _ in pairs)
            if self.rank is not None and total > self.rank:
                names = " + ".join(repr(name) for name, _, _ in loras)
                raise InvalidLora(
                    f"the LoRAs {names} add up to rank {total} on layer {layer}; this "
                    f"compiled server's LoRA slot holds rank {self.rank} (--lora-max-rank)"
                )
        with torch.no_grad():
            for layer, pairs in parts.items():
                if pairs or layer in self._dirty:
                    self._copy(self._layers[layer], pairs)
                if pairs:
                    self._dirty.add(layer)
                else:
                    self._dirty.discard(layer)
        for module in self._layers.values():
            module.enable_adapters(True)
        self._on = True

    def _copy(self, module: Any, pairs: Parts) -> None:
        a_slot, b_slot = module.lora_A[SLOT].weight, module.lora_B[SLOT].weight
        a_slot.zero_()
        b_slot.zero_()
        start = 0
        for (a, b), scale in pairs:
            end = start + a.shape[0]
            a_slot[start:end].copy_(a)
            b_slot[:, start:end].copy_(_scaled(b, scale))
            start = end

    def deactivate(self) -> None:
        """Back to the base model: every layer of the slot calls its base layer alone."""
        if self._on:
            for module in self._layers.values():
                module.enable_adapters(False)
            self._on = False


def lora_target(transformer: nn.Module, compiled: bool) -> LoraTarget:
    """The compiled model's slot (prepared by `LoraSlot.inject`), or branches patched per
    job over the layers of an uncompiled one."""
    return LoraSlot.of(transformer) if compiled else LoraBranches.of(transformer)


class LoraManager:
    """Where LoRAs go, and an LRU cache of read LoRAs. Used from the engine's worker only,
    but `loaded` may be read from any thread."""

    def __init__(self, target: LoraTarget, spec: LoraSpec) -> None:
        self._target = target
        self._spec = spec
        self._shapes = target.shapes
        self._cache: OrderedDict[str, tuple[tuple[int, int], LoadedLora]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def max_rank(self) -> int | None:
        return self._target.rank

    def loaded(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._cache)

    @contextmanager
    def applied(self, refs: Sequence[LoraRef]) -> Iterator[tuple[AppliedLora, ...]]:
        """Within: `refs` active with their scales; after: the base model. A LoRA at scale
        0 is read (a broken file still fails) but not switched on."""
        if not refs:
            yield ()
            return
        loaded = [self._get(ref) for ref in refs]
        pairs = list(zip(refs, loaded, strict=True))
        echo = tuple(AppliedLora(ref.name, ref.scale, lora.not_applied) for ref, lora in pairs)
        active = [(ref.name, lora, ref.scale) for ref, lora in pairs if ref.scale != 0]
        if not active:
            yield echo
            return
        try:
            self._target.activate(active)
            yield echo
        finally:
            self._target.deactivate()

    def _get(self, ref: LoraRef) -> LoadedLora:
        if not ref.file:
            return LoadedLora(layers={})
        with self._lock:
            hit = self._cache.get(ref.file)
            if hit is not None and hit[0] == ref.version:
                self._cache.move_to_end(ref.file)
                return hit[1]
        started = time.perf_counter()
        lora = read_lora(
            ref,
            self._shapes,
            max_bytes=self._spec.max_bytes,
            dtype=self._target.dtype,
            device=self._target.device,
        )
        rank = self._target.rank
        if rank is not None and lora.rank > rank:
            raise InvalidLora(
                f"the LoRA {ref.name!r} has rank {lora.rank}; this compiled server's LoRA slot "
                f"holds rank {rank} (--lora-max-rank)"
            )
        with self._lock:
            self._cache[ref.file] = (ref.version, lora)
            self._cache.move_to_end(ref.file)
            while len(self._cache) > self._spec.cache:
                evicted, _ = self._cache.popitem(last=False)
                logger.info("LoRA cache full: dropped %s", os.path.basename(evicted))
        logger.info(
            "loaded LoRA %s (rank %d, %d layers) in %.0f ms",
            ref.name,
            lora.rank,
            len(lora.layers),
            (time.perf_counter() - started) * 1000,
        )
        return lora
