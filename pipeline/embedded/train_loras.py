"""Train the example LoRAs for the embedded model, on a CPU, in about a minute each.

    python -m pipeline.embedded.train_loras [--out examples/loras] [--steps 300] [STYLE ...]

Each LoRA is rank 4 on the transformer's attention and MLP projections, trained with the
embedded model's own rectified-flow loss (`pipeline.embedded.train`) against scenes drawn
in one of `scenes.STYLES` ("outline": shapes as outlines; "pastel": colours mixed with
white), with the base model frozen. As the shipped model is guidance-distilled, each
caption gets a guidance value drawn as in its distillation. Every step's data and the
LoRA's initial weights come from fixed seeds, so a rerun writes the same bytes (about a
minute a style on two cores). The files are diffusers/PEFT LoRAs
(`transformer.<layer>.lora_A.weight`, float16), what the server's `--lora-dir` loads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from pipeline.embedded import MODEL_DIR
from pipeline.embedded.train import (
    SEED,
    FlowStage,
    batches,
    descend,
    encode_text,
    log,
    predict,
    step_rng,
    weighted_mse,
)
from pipeline.loras import DOUBLE_BLOCK_PROJECTIONS, SINGLE_BLOCK_PROJECTIONS

EXAMPLES = ("outline", "pastel")
RANK = 4
# Up to 256 px and about 500 image tokens a step (the base model took 2,000): a style is
# local, and small steps are cheap.
LORA_STAGE = FlowStage(
    steps=300,
    lr=1e-3,
    buckets=((128, 128, 8, 0.4), (192, 192, 4, 0.3), (256, 256, 2, 0.2), (256, 192, 2, 0.1)),
)


def targets(transformer: FluxTransformer2DModel) -> list[str]:
    """The projections of every block, by module name, as ai-toolkit trains them."""
    double = [
        f"transformer_blocks.{i}.{layer}"
        for i in range(len(transformer.transformer_blocks))
        for layer in DOUBLE_BLOCK_PROJECTIONS
    ]
    single = [
        f"single_transformer_blocks.{i}.{layer}"
        for i in range(len(transformer.single_transformer_blocks))
        for layer in SINGLE_BLOCK_PROJECTIONS
    ]
    return double + single


def train_lora(
    pipe: FluxPipeline, style: str, steps: int, stage: FlowStage = LORA_STAGE
) -> dict[str, torch.Tensor]:
    """A LoRA that draws the scene world in `style`, as diffusers/PEFT-layout tensors."""
    transformer = pipe.transformer
    torch.manual_seed(SEED)
    transformer.add_adapter(
        LoraConfig(
            r=RANK,
            lora_alpha=RANK,
            target_modules=targets(transformer),
            init_lora_weights="gaussian",
        ),
        adapter_name=style,
    )
    transformer.set_adapter(style)
    trained = [
        p for name, p in transformer.named_parameters() if "lora_" in name and p.requires_grad
    ]
    opt = torch.optim.AdamW(trained, lr=stage.lr, weight_decay=0.0)
    transformer.train()
    running = 0.0
    phase = f"lora-{style}"
    for step, batch in batches(pipe, stage, phase, 0, steps, style):
        for group in opt.param_groups:
            group["lr"] = stage.lr * min(1.0, (step + 1) / 20)
        rng = step_rng(f"{phase}-guidance", step)
        with torch.no_grad():
            pooled, sequence = encode_text(pipe, batch.captions)
        guidance = torch.tensor([rng.uniform(1.0, 6.0) for _ in batch.said])
        loss = weighted_mse(predict(transformer, batch, pooled, sequence, guidance), batch)
        descend(opt, loss)
        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(phase, step, steps, loss=loss.item(), smooth=running)
    transformer.eval()
    base, tuned = held_out_loss(pipe, stage, style)
    print(f"{style}: held-out loss {base:.4f} without the LoRA, {tuned:.4f} with it", flush=True)
    state = get_peft_model_state_dict(transformer, adapter_name=style)
    transformer.unload_lora()
    return {
        f"transformer.{key}": value.detach().half().contiguous() for key, value in state.items()
    }


@torch.no_grad()
def held_out_loss(
    pipe: FluxPipeline, stage: FlowStage, style: str, count: int = 8
) -> tuple[float, float]:
    """The loss on `count` batches no step saw, without and with the active LoRA."""
    transformer = pipe.transformer
    losses: dict[bool, float] = {False: 0.0, True: 0.0}
    for step, batch in batches(pipe, stage, f"lora-{style}-held-out", 0, count, style):
        pooled, sequence = encode_text(pipe, batch.captions)
        guidance = torch.full((len(batch.said),), 1.0 + step * 5 / count)
        for enabled in (False, True):
            if enabled:
                transformer.enable_adapters()
            else:
                transformer.disable_adapters()
            prediction = predict(transformer, batch, pooled, sequence, guidance)
            losses[enabled] += weighted_mse(prediction, batch).item() / count
    transformer.enable_adapters()
    return losses[False], losses[True]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("styles", nargs="*", help=f"of {', '.join(EXAMPLES)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path("examples/loras"))
    parser.add_argument("--steps", type=int, default=LORA_STAGE.steps)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if unknown := set(args.styles) - set(EXAMPLES):
        parser.error(f"unknown styles {sorted(unknown)}; the examples are {', '.join(EXAMPLES)}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    pipe = FluxPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).requires_grad_(False).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    for style in args.styles or EXAMPLES:
        started = time.monotonic()
        tensors = train_lora(pipe, style, args.steps)
        path = args.out / f"{style}.safetensors"
        # One metadata key: safetensors writes several in no fixed order.
        made_by = f"python -m pipeline.embedded.train_loras {style} --steps {args.steps}"
        save_file(tensors, str(path), metadata={"made_by": made_by})
        minutes = (time.monotonic() - started) / 60
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB) in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
