"""Train the embedded model on the scene world, on a CPU, and write it as a diffusers folder.

    python -m pipeline.embedded.train [--work .train] [--out pipeline/embedded] [--bf16]

The phases, each resumable from the work folder (a phase that finished is skipped; a
long one restarts from its last checkpoint, with the same data it would have seen):
1. the VAE learns to reconstruct scenes (FLUX's shape: 16 channels, 8x down), with a
   linear read-out of each latent pixel's colour so that `linear` previews can work;
2. the text encoders learn the grammar: from CLIP's pooled output and from T5's tokens,
   linear heads must tell every fact a caption states (background, and each object's
   shape, colour, size and position). FLUX's encoders come pretrained and frozen; so do
   ours after this phase (trained only through the image loss, CLIP's pooled vector
   stayed the same for every caption and colours were never learned);
3. the transformer learns rectified flow, FLUX's way (x_t = (1 - s) x0 + s noise, the
   model predicts noise - x0, s logit-normal and shifted by the image's token count),
   with 10 % empty captions and object pixels weighted up, at many sizes;
4. it goes on learning, in a second learning-rate cycle, where it is judged: mostly at
   the default 256x256, on scenes of one object three times in four (binding a colour and
   a place to one object comes first), with sides taught by mirror pairs (half of each
   batch is a scene and its left-right flip, captioned with left and right swapped) and
   small objects' pixels counting more;
5. a third, short cycle on one-object scenes, mostly at 256x256 and most of it at high
   noise levels, where a picture's layout and colours are decided;
6. guidance distillation, as FLUX.1 [dev] was made: a student learns to give in one call
   what classifier-free guidance at scale g gives the teacher in two, with g in its
   guidance embedding, so `guidance_scale` means what it means for [dev];
7. a TAEF1-style tiny decoder learns the VAE's decode, for cheap previews.
Every step's data comes from a seed fixed by the step's number. `--tiny` trains a toy for
a few steps (the test suite runs it so that this script cannot rot).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from pipeline.embedded import (
    MAX_SEQUENCE_LENGTH,
    TINY_SHAPE,
    EmbeddedShape,
    build_embedded_pipeline,
    scenes,
    tiny_vae,
)
from pipeline.preview_cache import SHIPPED_MAP
from pipeline.previews import LinearPreviewDecoder, pipeline_latents, vae_latents

SEED = 20261129
Buckets = tuple[tuple[int, int, int, float], ...]
# Training sizes (width, height) with their batch sizes and odds, about 2,000 image tokens a
# step: the default 256x256 most often (prompt following is judged there), and smaller,
# wider, taller and larger ones so that positions and scale carry over to every shape the
# server is asked for, and 512x512 stays coherent (no token position goes unseen).
BUCKETS: Buckets = (
    (256, 256, 8, 0.42),
    (128, 128, 32, 0.08),
    (192, 192, 14, 0.08),
    (320, 192, 9, 0.05),
    (192, 320, 9, 0.05),
    (384, 256, 5, 0.06),
    (256, 384, 5, 0.06),
    (384, 384, 4, 0.08),
    (512, 512, 2, 0.06),
    (512, 320, 3, 0.03),
    (320, 512, 3, 0.03),
)

# The second cycle's sizes: the default size above all (where prompt following is judged),
# the others only so that they are not forgotten.
POLISH_BUCKETS: Buckets = (
    (256, 256, 8, 0.70),
    (128, 128, 32, 0.07),
    (192, 192, 14, 0.07),
    (384, 384, 4, 0.06),
    (512, 512, 2, 0.06),
    (384, 256, 5, 0.02),
    (256, 384, 5, 0.02),
)

# The third cycle's: the default size, and 512x512 a fifth of the time (at 256x256 alone
# the cycle left 512x512's objects scattered in more pieces than before it). The cycle is
# named "shape" for what it was first tried for (it did little for shapes; its data are
# seeded by that name).
SHAPE_BUCKETS: Buckets = ((256, 256, 8, 0.8), (512, 512, 2, 0.2))


@dataclass(frozen=True)
class FlowStage:
    """A run of the transformer's training: its steps, peak learning rate, sizes, and how
    often a scene has one object (None: as the grammar draws them, one or two equally).

    `mirrored` is the share of each batch (at most a half) given as mirror pairs: a scene
    with an object off the vertical centre line and its left-right flip, both captions
    stating positions, so that the two differ only in the side words. `small_weight` is how
    much more a small object's tokens count in the loss than a large one's (a small object
    covers a third of the tokens, so it weighed a third as much). `on_grid` is the share of
    pictures noised to a level a sampler steps through instead of a logit-normal draw.
    `noise_shift` is added to the shift (mu) that FLUX's scheduler gives the picture's
    token count: above 0 the logit-normal's levels move towards pure noise, where the
    layout and colours are decided (1.5 makes the shift at 256x256 e^2, about 7.4)."""

    steps: int
    lr: float
    buckets: Buckets
    one_object: float | None = None
    mirrored: float = 0.0
    small_weight: float = 1.0
    on_grid: float = 0.0
    noise_shift: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Steps of each phase; the shipped model's plan takes about 65 minutes on two cores
    with `--bf16`."""

    shape: EmbeddedShape = field(default_factory=EmbeddedShape)
    vae_steps: int = 3000
    text_steps: int = 1200
    # The transformer's learning-rate cycles, each a resumable phase of its own name.
    flow: tuple[tuple[str, FlowStage], ...] = (
        ("flow", FlowStage(3600, 6e-4, BUCKETS)),
        (
            "polish",
            FlowStage(4000, 3e-4, POLISH_BUCKETS, one_object=0.75, mirrored=0.5, small_weight=1.7),
        ),
        ("shape", FlowStage(1200, 3e-4, SHAPE_BUCKETS, one_object=1.0, noise_shift=1.5)),
    )
    distill: FlowStage = FlowStage(500, 3e-4, POLISH_BUCKETS, one_object=0.75, on_grid=0.75)
    tiny_steps: int = 1200
    checkpoint_every: int = 200


_TOY_BUCKETS: Buckets = ((64, 64, 2, 0.5), (64, 32, 2, 0.5))
# Four pictures a step, so that the toy's polish has a mirror pair.
_TOY_PAIR_BUCKETS: Buckets = ((64, 64, 4, 1.0),)
TINY_PLAN = Plan(
    shape=TINY_SHAPE,
    vae_steps=3,
    text_steps=2,
    flow=(
        ("flow", FlowStage(4, 6e-4, _TOY_BUCKETS)),
        ("polish", FlowStage(2, 3e-4, _TOY_PAIR_BUCKETS, mirrored=0.5, small_weight=1.7)),
        ("shape", FlowStage(2, 3e-4, _TOY_BUCKETS, one_object=1.0, noise_shift=1.5)),
    ),
    distill=FlowStage(2, 1.5e-4, _TOY_BUCKETS, on_grid=0.5),
    tiny_steps=2,
    checkpoint_every=2,
)


def float32() -> torch.autocast:
    """Where a `--bf16` run still multiplies in float32: the text encoders (small, and
    what every caption is read through), the VAE's colour read-out and its latent
    statistics. A new context each time: one autocast object saves the state it restores,
    so nesting the same one would leave bfloat16 off."""
    return torch.autocast("cpu", enabled=False)


def mixed_precision(bf16: bool) -> torch.autocast:
    """The whole run's context: without its weight cache, which lives until the outermost
    autocast exits and so would give every forward pass the first step's weights."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)


def log(phase: str, step: int, total: int, **values: float) -> None:
    shown = " ".join(f"{name} {value:.4f}" for name, value in values.items())
    print(f"[{time.strftime('%H:%M:%S')}] {phase} {step}/{total} {shown}", flush=True)


def step_rng(phase: str, step: int) -> random.Random:
    return random.Random(f"{SEED}-{phase}-{step}")


def scene_batch(
    rng: random.Random,
    width: int,
    height: int,
    count: int,
    style: str = "plain",
    one_object: float | None = None,
) -> tuple[list[scenes.Scene], torch.Tensor]:
    """`count` scenes and their pictures in [-1, 1], (count, 3, height, width)."""
    drawn = [drawn_scene(rng, one_object) for _ in range(count)]
    return drawn, pictures(drawn, width, height, style)


def drawn_scene(rng: random.Random, one_object: float | None) -> scenes.Scene:
    """A scene of one object with odds `one_object`, else of two (None: as the grammar
    draws them)."""
    if one_object is None:
        return scenes.random_scene(rng)
    return scenes.random_scene(rng, objects=1 if rng.random() < one_object else 2)


def pictures(drawn: list[scenes.Scene], width: int, height: int, style: str) -> torch.Tensor:
    """The scenes rendered in [-1, 1], (count, 3, height, width)."""
    pixels = np.stack([scenes.render(scene, width, height, style=style) for scene in drawn])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) * 2 - 1


# Positions and their left-right mirror images (the others mirror to themselves).
MIRRORED_POSITIONS = {
    "left": "right",
    "right": "left",
    "top left": "top right",
    "top right": "top left",
    "bottom left": "bottom right",
    "bottom right": "bottom left",
}


def mirror(scene: scenes.Scene) -> scenes.Scene:
    """`scene` flipped left to right. Every shape is symmetric about its vertical axis, so
    rendering this is flipping the picture: only the positions and x jitters change."""
    items = tuple(
        replace(item, position=MIRRORED_POSITIONS.get(item.position, item.position), dx=-item.dx)
        for item in scene.objects
    )
    return replace(scene, objects=items)


def sided_scene(rng: random.Random, one_object: float | None) -> scenes.Scene:
    """A scene with an object off the vertical centre line: mirroring it changes it."""
    while True:
        scene = drawn_scene(rng, one_object)
        if any(item.position in MIRRORED_POSITIONS for item in scene.objects):
            return scene


@dataclass(frozen=True)
class Said:
    """A training scene and how much of it its caption states: captions as people write
    them, 10 % empty (for guidance), some without sizes or positions (the picture still
    has them: such a caption allows any)."""

    scene: scenes.Scene
    empty: bool = False
    sizes: bool = True
    positions: bool = True

    @classmethod
    def draw(cls, rng: random.Random, scene: scenes.Scene) -> Said:
        return cls(scene, rng.random() < 0.1, rng.random() > 0.25, rng.random() > 0.15)

    @classmethod
    def mirror_pair(cls, rng: random.Random, scene: scenes.Scene) -> tuple[Said, Said]:
        """`scene` and its mirror, both captioned with positions (the pair teaches sides)."""
        said = cls(scene, sizes=rng.random() > 0.25)
        return said, replace(said, scene=mirror(scene))

    @property
    def caption(self) -> str:
        if self.empty:
            return ""
        return scenes.caption(self.scene, sizes=self.sizes, positions=self.positions)

    def labels(self) -> list[int]:
        """One class per fact in `FACTS`; the last class of each is 'not said'."""
        backgrounds = [*scenes.COLOURS, *scenes.SKIES]
        facts = [len(backgrounds) if self.empty else backgrounds.index(self.scene.background)]
        for slot in range(2):
            item = self.scene.objects[slot] if slot < len(self.scene.objects) else None
            if item is None or self.empty:
                facts += [len(scenes.SHAPES), len(scenes.COLOURS), len(scenes.SIZES)]
                facts.append(len(scenes.POSITIONS))
                continue
            facts += [scenes.SHAPES.index(item.shape), list(scenes.COLOURS).index(item.colour)]
            facts.append(list(scenes.SIZES).index(item.size) if self.sizes else len(scenes.SIZES))
            facts.append(
                list(scenes.POSITIONS).index(item.position)
                if self.positions
                else len(scenes.POSITIONS)
            )
        return facts


# How many classes each fact in `Said.labels` has, 'not said' included.
FACTS = (
    len(scenes.COLOURS) + len(scenes.SKIES) + 1,
    *(
        len(scenes.SHAPES) + 1,
        len(scenes.COLOURS) + 1,
        len(scenes.SIZES) + 1,
        len(scenes.POSITIONS) + 1,
    )
    * 2,
)


def descend(
    opt: torch.optim.Optimizer, loss: torch.Tensor, clip: torch.nn.Module | None = None
) -> None:
    """One optimiser step on `loss`; the transformer's gradients are clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
    opt.step()


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def tokenizer_stamp(*tokenizers: PreTrainedTokenizerBase) -> str:
    """A digest of the tokenizers' vocabularies: the ids the text encoders learn."""
    vocabularies = [sorted(t.get_vocab().items()) for t in tokenizers]
    return hashlib.sha256(json.dumps(vocabularies).encode()).hexdigest()[:16]


class StaleCheckpoint(RuntimeError):
    """A checkpoint made with other token ids than this script's tokenizers give."""


class Checkpoints:
    """A phase's state in the work folder: `done` marks a finished phase. Each checkpoint
    carries the tokenizers' stamp and only a matching one loads: weights trained on other
    token ids would load silently and read every caption wrong."""

    def __init__(self, work: Path, stamp: str) -> None:
        self.work = work
        self.stamp = stamp
        work.mkdir(parents=True, exist_ok=True)

    def done(self, phase: str) -> bool:
        return (self.work / f"{phase}.done").is_file()

    def finish(self, phase: str) -> None:
        (self.work / f"{phase}.done").touch()

    def save(self, phase: str, step: int, state: dict[str, Any]) -> None:
        staging = self.work / f"{phase}.pt.tmp"
        torch.save({"step": step, "tokenizers": self.stamp, **state}, staging)
        staging.replace(self.work / f"{phase}.pt")

    def load(self, phase: str) -> dict[str, Any] | None:
        path = self.work / f"{phase}.pt"
        if not path.is_file():
            return None
        state: dict[str, Any] = torch.load(path, weights_only=False)
        if state.get("tokenizers") != self.stamp:
            raise StaleCheckpoint(
                f"{path} was made with other tokenizers than these; train in a new --work folder"
            )
        return state

    def final(self, phase: str) -> dict[str, Any]:
        """The state a finished phase saved last."""
        state = self.load(phase)
        if state is None:
            raise FileNotFoundError(f"{phase} is marked done but has no checkpoint")
        return state


def resumed(
    checkpoints: Checkpoints,
    phase: str,
    modules: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
) -> tuple[int, dict[str, Any]]:
    """Load the phase's last checkpoint into `modules` and `opt`; the step to go on from,
    and the whole checkpoint (empty when starting afresh) for what else it holds."""
    state = checkpoints.load(phase)
    if state is None:
        return 0, {}
    for name, module in modules.items():
        module.load_state_dict(state[name])
    opt.load_state_dict(state["optimizer"])
    print(f"resuming {phase} at step {state['step']}", flush=True)
    return int(state["step"]), state


def train_vae(vae: AutoencoderKL, plan: Plan, checkpoints: Checkpoints) -> torch.nn.Conv2d:
    """Reconstruction (L1, plus a little MSE) with a small KL term, on 64-160 px scenes.

    A 1x1 convolution must also read each latent pixel's mean colour off the latent: then
    the latent holds its colour linearly, which is what a `linear` preview assumes (without
    it, the fitted map gave previews 10 dB from the final image). That read-out is returned:
    it ships as the model's linear preview map."""
    readout = torch.nn.Conv2d(vae.config.latent_channels, 3, 1)
    if checkpoints.done("vae"):
        state = checkpoints.final("vae")
        vae.load_state_dict(state["vae"])
        readout.load_state_dict(state["readout"])
        return readout
    # Start the posterior nearly deterministic (log-variance -8): at 0, its noise hides
    # most of what the encoder says and the reconstruction learns far more slowly.
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels :] = -8.0
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    parts = {"vae": vae, "readout": readout}
    opt = torch.optim.AdamW([*vae.parameters(), *readout.parameters()], lr=1e-3, weight_decay=0)
    start, _ = resumed(checkpoints, "vae", parts, opt)
    vae.train()
    for step in range(start, plan.vae_steps):
        rng = step_rng("vae", step)
        side = rng.choice((64, 96, 128))
        _, images = scene_batch(rng, side, rng.choice((side, 96)), 8)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, plan.vae_steps, 1e-3)
        posterior = vae.encode(images).latent_dist
        noisy = posterior.sample(generator=torch.Generator().manual_seed(step))
        decoded = vae.decode(noisy).sample.float()
        l1 = (decoded - images).abs().mean()
        mse = ((decoded - images) ** 2).mean()
        kl = posterior.kl().mean() / images[0].numel()
        with float32():
            colours = readout(posterior.mean.float())
        linear = (colours - torch.nn.functional.avg_pool2d(images, factor)) ** 2
        loss = l1 + mse + 1e-4 * kl + 0.5 * linear.mean()
        descend(opt, loss)
        if step % 50 == 0 or step == plan.vae_steps - 1:
            log(
                "vae",
                step,
                plan.vae_steps,
                l1=l1.item(),
                psnr=-10 * math.log10(mse.item() / 4),
                linear_psnr=-10 * math.log10(linear.mean().item() / 4),
                kl=kl.item(),
            )
        if (step + 1) % plan.checkpoint_every == 0 or step == plan.vae_steps - 1:
            state = {name: part.state_dict() for name, part in parts.items()}
            checkpoints.save("vae", step + 1, {**state, "optimizer": opt.state_dict()})
    checkpoints.finish("vae")
    return readout


@torch.no_grad()
@float32()
def fit_latent_scale(vae: AutoencoderKL) -> None:
    """Set the VAE's shift and scaling factors so that the transformer sees latents of mean
    0 and variance 1, as FLUX's factors do for its VAE (measured in float32 whatever the
    run multiplies in: they ship in the model's config)."""
    vae.eval()
    _, images = scene_batch(step_rng("scale", 0), 128, 128, 64)
    latents = vae.encode(images).latent_dist.mean
    shift, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(1 / std, 4))
    print(f"latent shift {shift:.4f}, scale {1 / std:.4f}", flush=True)


class FlowBatch:
    """One training batch in the transformer's own terms, as `FluxPipeline` builds them."""

    def __init__(
        self,
        pipe: FluxPipeline,
        rng: random.Random,
        width: int,
        height: int,
        count: int,
        step: int,
        stage: FlowStage,
        style: str = "plain",
    ) -> None:
        pairs = int(count * stage.mirrored) // 2
        drawn, images = scene_batch(rng, width, height, count - 2 * pairs, style, stage.one_object)
        self.step = step
        self.said = [Said.draw(rng, scene) for scene in drawn]
        if pairs:
            twins = [
                said
                for _ in range(pairs)
                for said in Said.mirror_pair(rng, sided_scene(rng, stage.one_object))
            ]
            self.said += twins
            images = torch.cat([images, pictures([s.scene for s in twins], width, height, style)])
            drawn = [said.scene for said in self.said]
        vae = pipe.vae
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(
                generator=torch.Generator().manual_seed(step)
            )
        latents = pipeline_latents(vae, latents.float())
        channels, h, w = latents.shape[1:]
        self.clean = pipe._pack_latents(latents, count, channels, h, w)
        self.img_ids = pipe._prepare_latent_image_ids(count, h // 2, w // 2, "cpu", torch.float32)
        self.weights = self._object_weights(drawn, width, height, stage.small_weight)
        generator = torch.Generator().manual_seed(SEED + step)
        self.noise = torch.randn(self.clean.shape, generator=generator)
        # The shift the pipeline's scheduler gives this token count, as `FluxPipeline` does.
        schedule = pipe.scheduler.config
        mu = calculate_shift(
            self.clean.shape[1],
            schedule.base_image_seq_len,
            schedule.max_image_seq_len,
            schedule.base_shift,
            schedule.max_shift,
        )
        mu += stage.noise_shift
        logits = torch.randn(count, generator=generator)
        sigma = torch.sigmoid(logits)
        if stage.on_grid:
            sigma = torch.where(
                torch.rand(count, generator=generator) < stage.on_grid,
                self._sampler_grid(count, generator),
                sigma,
            )
        self.sigma = math.exp(mu) * sigma / (1 + (math.exp(mu) - 1) * sigma)
        s = self.sigma[:, None, None]
        self.noisy = (1 - s) * self.clean + s * self.noise
        self.target = self.noise - self.clean

    @property
    def captions(self) -> list[str]:
        return [said.caption for said in self.said]

    @staticmethod
    def _sampler_grid(count: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels a sampler of 4 to 28 steps visits (before the shift), pure noise
        included: what `FluxPipeline` asks the transformer at, which the logit-normal
        draw reaches near 1 in under 1 % of pictures."""
        steps = torch.randint(4, 29, (count,), generator=generator)
        index = (torch.rand(count, generator=generator) * steps).floor()
        return 1 - index / steps

    @staticmethod
    def _object_weights(
        drawn: list[scenes.Scene], width: int, height: int, small_weight: float
    ) -> torch.Tensor:
        """Per-token loss weights: flat backgrounds would dominate the loss, so the tokens
        an object covers count up to four times more (a small object's `small_weight`
        times that again, or it weighs a third of a large one)."""
        masks = []
        for scene in drawn:
            cover = np.zeros((height, width), np.float32)
            for item in scene.objects:
                weight = small_weight if item.size == "small" else 1.0
                cover = np.maximum(cover, weight * scenes.object_mask(item, width, height))
            masks.append(cover)
        pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(np.stack(masks))[:, None], 16)
        return 1 + 3 * pooled.flatten(1).clamp(0, max(1.0, small_weight))


@float32()
def encode_text(pipe: FluxPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled CLIP and T5 sequence embeddings exactly as the pipeline makes them."""
    pooled = pipe._get_clip_prompt_embeds(captions, device="cpu")
    sequence = pipe._get_t5_prompt_embeds(
        captions, max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu"
    )
    return pooled, sequence


def predict(
    transformer: torch.nn.Module,
    batch: FlowBatch,
    pooled: torch.Tensor,
    sequence: torch.Tensor,
    guidance: torch.Tensor,
) -> torch.Tensor:
    velocity = transformer(
        hidden_states=batch.noisy,
        timestep=batch.sigma,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=sequence,
        txt_ids=torch.zeros(sequence.shape[1], 3),
        img_ids=batch.img_ids,
        return_dict=False,
    )[0]
    return velocity.float()


def weighted_mse(prediction: torch.Tensor, batch: FlowBatch) -> torch.Tensor:
    per_token = ((prediction - batch.target) ** 2).mean(dim=-1)
    return (per_token * batch.weights).sum() / batch.weights.sum()


def batches(
    pipe: FluxPipeline, stage: FlowStage, phase: str, start: int, total: int, style: str = "plain"
) -> Iterator[tuple[int, FlowBatch]]:
    sizes, odds = [(w, h, n) for w, h, n, _ in stage.buckets], [p for *_, p in stage.buckets]
    for step in range(start, total):
        rng = step_rng(phase, step)
        width, height, count = rng.choices(sizes, odds)[0]
        yield step, FlowBatch(pipe, rng, width, height, count, step, stage, style)


@float32()
def train_text(pipe: FluxPipeline, plan: Plan, checkpoints: Checkpoints) -> None:
    """Both text encoders learn to state every fact of a caption in a linearly readable
    form (CLIP in its pooled vector, T5 across its tokens), then are frozen."""
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    if not checkpoints.done("text"):
        width = plan.shape.text_dim
        heads = {
            "clip_head": torch.nn.Linear(width, sum(FACTS)),
            "t5_head": torch.nn.Linear(width, sum(FACTS)),
        }
        parts = {**encoders, **heads}
        opt = torch.optim.AdamW([p for part in parts.values() for p in part.parameters()], lr=1e-3)
        start, _ = resumed(checkpoints, "text", parts, opt)
        for part in parts.values():
            part.train()
        for step in range(start, plan.text_steps):
            rng = step_rng("text", step)
            said = [Said.draw(rng, scenes.random_scene(rng)) for _ in range(128)]
            labels = torch.tensor([s.labels() for s in said])
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, plan.text_steps, 1e-3, warmup=20)
            pooled, sequence = encode_text(pipe, [s.caption for s in said])
            losses, right = [], {}
            read = {"clip": heads["clip_head"](pooled), "t5": heads["t5_head"](sequence.mean(1))}
            for encoder, logits in read.items():
                correct = []
                for fact, scores in enumerate(logits.split(FACTS, dim=-1)):
                    losses.append(torch.nn.functional.cross_entropy(scores, labels[:, fact]))
                    correct.append((scores.argmax(-1) == labels[:, fact]).float().mean())
                right[encoder] = torch.stack(correct).mean().item()
            loss = torch.stack(losses).sum()
            descend(opt, loss)
            if step % 50 == 0 or step == plan.text_steps - 1:
                log("text", step, plan.text_steps, loss=loss.item(), **right)
            if (step + 1) % plan.checkpoint_every == 0 or step == plan.text_steps - 1:
                state = {name: part.state_dict() for name, part in parts.items()}
                checkpoints.save("text", step + 1, {**state, "optimizer": opt.state_dict()})
        checkpoints.finish("text")
    state = checkpoints.final("text")
    for name, encoder in encoders.items():
        encoder.load_state_dict(state[name])
        encoder.requires_grad_(False).eval()


class Ema:
    """An exponential moving average of weights: what ships, steadier than the last step."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value, 1 - self.decay)
            else:
                self.shadow[key].copy_(value)


def fit_transformer(
    pipe: FluxPipeline,
    stage: FlowStage,
    phase: str,
    checkpoints: Checkpoints,
    every: int,
    loss_of: Callable[[FlowBatch], torch.Tensor],
    weight_decay: float,
) -> None:
    """The transformer's training loop, from where it stands: a cosine learning rate, the
    EMA weights kept (and left in the transformer at the end), a checkpoint every `every`
    steps."""
    transformer = pipe.transformer
    if checkpoints.done(phase):
        transformer.load_state_dict(checkpoints.final(phase)["ema"])
        return
    opt = torch.optim.AdamW(
        transformer.parameters(), lr=stage.lr, weight_decay=weight_decay, betas=(0.9, 0.99)
    )
    ema = Ema(transformer, 0.998)
    start, state = resumed(checkpoints, phase, {"transformer": transformer}, opt)
    if start:
        ema.shadow = state["ema"]
    transformer.train()
    running = 0.0
    for step, batch in batches(pipe, stage, phase, start, stage.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, stage.steps, stage.lr)
        loss = loss_of(batch)
        descend(opt, loss, clip=transformer)
        ema.update(transformer)
        running = loss.item() if step == start else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == stage.steps - 1:
            log(phase, step, stage.steps, loss=loss.item(), smooth=running)
        if (step + 1) % every == 0 or step == stage.steps - 1:
            checkpoints.save(
                phase,
                step + 1,
                {
                    "transformer": transformer.state_dict(),
                    "ema": ema.shadow,
                    "optimizer": opt.state_dict(),
                },
            )
    transformer.load_state_dict(ema.shadow)
    checkpoints.finish(phase)


def train_flow(
    pipe: FluxPipeline, stage: FlowStage, phase: str, checkpoints: Checkpoints, every: int
) -> None:
    """Rectified flow on the scenes, guidance embedding 1, captions 10 % empty."""

    def loss_of(batch: FlowBatch) -> torch.Tensor:
        with torch.no_grad():
            pooled, sequence = encode_text(pipe, batch.captions)
        guidance = torch.ones(len(batch.said))
        return weighted_mse(predict(pipe.transformer, batch, pooled, sequence, guidance), batch)

    fit_transformer(pipe, stage, phase, checkpoints, every, loss_of, weight_decay=0.01)


def train_distilled_guidance(pipe: FluxPipeline, plan: Plan, checkpoints: Checkpoints) -> None:
    """The student's velocity at guidance g learns the teacher's uncond + g (cond - uncond).
    Most of its pictures are noised to levels a sampler steps through: learned only at the
    logit-normal draw's levels, the student was furthest from the teacher at the first
    step (pure noise, where colours are chosen) and painted the asked colour 11 points less
    often than the teacher with classifier-free guidance."""
    teacher = copy.deepcopy(pipe.transformer).eval().requires_grad_(False)

    def loss_of(batch: FlowBatch) -> torch.Tensor:
        rng = step_rng("distill-scale", batch.step)
        with torch.no_grad():
            # The student learns guidance for real captions; the empty one is the teacher's
            # unconditional branch.
            captions = [replace(said, empty=False).caption for said in batch.said]
            pooled, sequence = encode_text(pipe, captions)
            empty_pooled, empty_sequence = encode_text(pipe, [""] * len(captions))
            ones = torch.ones(len(captions))
            cond = predict(teacher, batch, pooled, sequence, ones)
            uncond = predict(teacher, batch, empty_pooled, empty_sequence, ones)
            scale = torch.tensor([rng.uniform(1.0, 6.0) for _ in captions])
            batch.target = uncond + scale[:, None, None] * (cond - uncond)
        return weighted_mse(predict(pipe.transformer, batch, pooled, sequence, scale), batch)

    every = plan.checkpoint_every
    fit_transformer(pipe, plan.distill, "distill", checkpoints, every, loss_of, weight_decay=0.0)


def train_tiny_decoder(pipe: FluxPipeline, plan: Plan, checkpoints: Checkpoints) -> AutoencoderTiny:
    """The tiny decoder reads scaled latents and learns the VAE's decode of them (its
    encoder is distilled too, so that the folder is a whole AutoencoderTiny)."""
    tiny = tiny_vae(plan.shape.tiny_channels)
    if checkpoints.done("tiny"):
        tiny.load_state_dict(checkpoints.final("tiny")["tiny"])
        return tiny
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3, weight_decay=0.0)
    start, _ = resumed(checkpoints, "tiny", {"tiny": tiny}, opt)
    vae = pipe.vae.eval()
    for step in range(start, plan.tiny_steps):
        rng = step_rng("tiny", step)
        side = rng.choice((64, 128, 192))
        _, images = scene_batch(rng, side, side, 8)
        with torch.no_grad():
            raw = vae.encode(images).latent_dist.mean.float()
            scaled = pipeline_latents(vae, raw)
            # Half the latents are noised as the denoiser's x0 estimates are, early on.
            blur = torch.rand(len(scaled), 1, 1, 1) * (torch.rand(len(scaled), 1, 1, 1) < 0.5)
            scaled = (1 - blur) * scaled + blur * torch.randn(scaled.shape) * 0.5
            target = vae.decode(vae_latents(vae, scaled)).sample.float()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, plan.tiny_steps, 1e-3, warmup=20)
        decoded = tiny.decode(scaled).sample.float()
        encoded = tiny.encode(images).latents.float()
        loss = (decoded - target).abs().mean() + ((encoded - scaled.clamp(-3, 3)) ** 2).mean()
        descend(opt, loss)
        if step % 50 == 0 or step == plan.tiny_steps - 1:
            log("tiny", step, plan.tiny_steps, loss=loss.item())
    checkpoints.save(
        "tiny", plan.tiny_steps, {"tiny": tiny.state_dict(), "optimizer": opt.state_dict()}
    )
    checkpoints.finish("tiny")
    return tiny


def save_half(module: Any, folder: Path) -> None:
    """`save_pretrained`, with the weights stored in float16 to halve the repository's
    copy; they load back in whatever dtype the server runs."""
    module.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        tensors = load_file(weights)
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, weights
        )


def preview_map(readout: torch.nn.Conv2d, vae: AutoencoderKL) -> LinearPreviewDecoder:
    """The read-out (raw latents to colours in [-1, 1]) restated as the server's linear
    preview map: pipeline-space latents (raw - shift) * scale to colours in [0, 1]."""
    state = readout.state_dict()
    weight, bias = state["weight"][:, :, 0, 0], state["bias"]
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    return LinearPreviewDecoder(
        weight=weight / (2 * scale), bias=(weight.sum(dim=1) * shift + bias + 1) / 2
    )


def write_model(
    pipe: FluxPipeline, tiny: AutoencoderTiny, linear: LinearPreviewDecoder, out: Path
) -> None:
    model, tiny_dir = out / "model", out / "tiny_vae"
    for folder in (model, tiny_dir):
        shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(model)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        save_half(getattr(pipe, name), model / name)
    (model / SHIPPED_MAP).write_text(json.dumps(linear.as_dict()))
    save_half(tiny, tiny_dir)
    print(f"wrote {model} and {tiny_dir}", flush=True)


def train(plan: Plan, work: Path, out: Path, bf16: bool = False) -> None:
    """`bf16` multiplies in bfloat16 (weights and optimiser state stay float32): a
    transformer step takes two thirds of the time on a CPU with bfloat16 instructions.
    The shipped weights were trained so (without it the plan takes about 90 minutes)."""
    torch.manual_seed(SEED)
    torch.set_flush_denormal(True)
    pipe = build_embedded_pipeline(plan.shape)
    checkpoints = Checkpoints(work, tokenizer_stamp(pipe.tokenizer, pipe.tokenizer_2))
    with mixed_precision(bf16):
        readout = train_vae(pipe.vae, plan, checkpoints)
        fit_latent_scale(pipe.vae)
        pipe.vae.requires_grad_(False).eval()
        train_text(pipe, plan, checkpoints)
        for phase, stage in plan.flow:
            train_flow(pipe, stage, phase, checkpoints, plan.checkpoint_every)
        train_distilled_guidance(pipe, plan, checkpoints)
        tiny = train_tiny_decoder(pipe, plan, checkpoints)
    write_model(pipe, tiny, preview_map(readout, pipe.vae), out)


# glibc hands large freed buffers back to the system and faults them in again at the next
# step: with batches of changing shapes that was 80,000 page faults a second and most of
# the CPU's time in the kernel. Keeping them in the process costs some memory.
ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(2**30),
}


def with_allocator_settings(argv: list[str]) -> None:
    """Run this script again with `ALLOCATOR` in its environment, unless it has them: glibc
    reads them only when the process starts."""
    if all(os.environ.get(name) == value for name, value in ALLOCATOR.items()):
        return
    command = [sys.executable, "-m", "pipeline.embedded.train", *argv]
    os.execve(sys.executable, command, {**os.environ, **ALLOCATOR})


def main(argv: list[str] | None = None) -> None:
    with_allocator_settings(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".train"), help="checkpoints (resumable)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent, help="writes model/ and tiny_vae/ here"
    )
    parser.add_argument("--tiny", action="store_true", help="a toy model in a few steps (tests)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bf16", action="store_true", help="multiply in bfloat16 (faster where the CPU has it)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    train(TINY_PLAN if args.tiny else Plan(), args.work, args.out, args.bf16)
    print(f"trained in {(time.monotonic() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
