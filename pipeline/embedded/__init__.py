"""The embedded model: a tiny FLUX built from a fixed seed, offline, with real diffusers classes.

No machine here reaches a model hub and most have no GPU, yet tests and first runs should
exercise every line of the real FLUX path: packed latents, the flow-matching scheduler with
dynamic shifting, distilled guidance, CLIP + T5 conditioning, a 16-channel VAE. So we build
the smallest models of those exact classes, train two tokenizers on a built-in word list,
save everything with `save_pretrained`, and load it back through `from_pretrained` like real
weights. The result is cached on disk; its pictures are abstract.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Bump when anything below changes, so that stale caches are rebuilt rather than reused.
EMBEDDED_VERSION = "2"
EMBEDDED_SEED = 20260101
TEXT_DIM = 32

_CORPUS = """
a an the of in on at by with and or under over above below beside near far into from
portrait photo photograph painting drawing sketch illustration render watercolor oil
lighthouse dusk dawn sunset sunrise night day morning evening storm rain snow fog mist
cat dog horse bird fish fox owl wolf bear lion tiger dragon robot astronaut knight wizard
red orange yellow green blue purple pink black white gray golden silver bright dark
sky sea ocean lake river forest mountain valley desert island city street house castle
tower bridge garden field flower tree leaf stone glass metal wood fire water light shadow
old young small large tall tiny huge beautiful quiet calm wild cozy ancient modern future
detailed cinematic realistic abstract minimal vivid soft sharp colorful neon studio
0 1 2 3 4 5 6 7 8 9 , . ! ? : ; - ' " ( ) & % + = / @ #
""".split()


def _clip_tokenizer() -> CLIPTokenizer:
    base = CLIPTokenizer().backend_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    base.train_from_iterator(_CORPUS * 4, trainer)
    state = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = state["vocab"]
    # Every byte must also exist as a word-final token, or unseen words fall to <unk>.
    for char in sorted(alphabet):
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [tuple(merge) for merge in state["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=sorted(set("".join(_CORPUS))),
        show_progress=False,
    )
    unigram.train_from_iterator(_CORPUS * 4, trainer)
    vocab = [tuple(entry) for entry in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def embedded_tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """CLIP (byte-level BPE) and T5 (unigram) tokenizers trained on the built-in word list."""
    return _clip_tokenizer(), _t5_tokenizer()


def flux_vae(
    block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int = 32
) -> AutoencoderKL:
    """FLUX's VAE shape: 16 latent channels, 8x downsampling, no quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=16,
        norm_num_groups=norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's flow-matching scheduler with resolution-dependent shifting."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_embedded_pipeline() -> FluxPipeline:
    """Build the tiny FLUX pipeline in memory; deterministic for a given library version."""
    torch.manual_seed(EMBEDDED_SEED)
    clip_tokenizer, t5_tokenizer = embedded_tokenizers()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
    vae = flux_vae(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def ensure_embedded_model(cache_dir: Path, *, kontext: bool = False) -> Path:
    """Return the folder of the embedded model, building it once if it is not cached yet.

    With `kontext`, the same components are saved as a `FluxKontextPipeline` (a Kontext
    model is FLUX's components under another pipeline class), so that reference editing
    runs offline too. The folder appears atomically (built in a temporary folder, then
    renamed), so that two processes starting together never load a half-written model.
    """
    name = "embedded-flux-kontext" if kontext else "embedded-flux"
    target = cache_dir / f"{name}-v{EMBEDDED_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".embedded-", dir=cache_dir))
    try:
        pipe = build_embedded_pipeline()
        (FluxKontextPipeline.from_pipe(pipe) if kontext else pipe).save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
