"""The embedded model: a tiny FLUX trained here on a scene world, shipped in the repository.

No machine here reaches a model hub and most have no GPU, yet tests and first runs should
exercise every line of the real FLUX path (packed latents, the flow-matching scheduler with
dynamic shifting, distilled guidance, CLIP + T5 conditioning, a 16-channel VAE) and show a
picture forming. So the embedded model is the smallest set of those exact diffusers
classes, trained by `python -m pipeline.embedded.train` on the captions and pictures of
`pipeline.embedded.scenes`, and committed as a diffusers folder (`model/`) beside a tiny
preview decoder (`tiny_vae/`). Serving loads it with `from_pretrained` like real weights;
nothing is built or trained at start-up.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from pipeline.embedded import scenes

HERE = Path(__file__).parent
MODEL_DIR = HERE / "model"
TINY_VAE_DIR = HERE / "tiny_vae"
# Bump when the shipped model changes, so that a cached Kontext twin is made again.
EMBEDDED_VERSION = "11"
# Captions are short: T5 reads 32 tokens, in training and in serving (FLUX reads 512); the
# T5 tokenizer declares it, so a copy of the model in another folder reads 32 too.
MAX_SEQUENCE_LENGTH = 32
# What a request that names no size gets: the size the model was trained to draw best.
DEFAULT_SIZE = (256, 256)

# The grammar's words, then words a person may try: those still get one token each.
_GRAMMAR_WORDS = sorted(
    {
        word
        for phrase in (
            *scenes.COLOURS,
            *scenes.SHAPES,
            *scenes.SIZES,
            *(scenes.position_phrase(p) for p in scenes.POSITIONS),
            *(scenes.background_phrase(b) for b in (*scenes.COLOURS, *scenes.SKIES)),
            "a an and",
        )
        for word in phrase.split()
    }
)
_OTHER_WORDS = """
the of by with or over above below beside near far into from portrait photo painting
drawing sketch render lighthouse dusk dawn sunrise day morning evening storm rain snow fog
cat dog horse bird fish fox owl wolf bear lion tiger dragon robot astronaut knight wizard
gray golden silver bright dark sea ocean lake river forest mountain valley desert island
city street castle tower bridge garden field flower leaf stone glass metal wood fire water
light shadow old young tall tiny huge beautiful quiet calm wild ancient modern big little
0 1 2 3 4 5 6 7 8 9 , . ! ? : ; - ' " ( ) & % + = / @ #
""".split()
_CORPUS = _GRAMMAR_WORDS * 8 + _OTHER_WORDS * 2


def _merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges over `words` (CLIP's spelling: the last letter carries `</w>`)
    until each word is one symbol. Ties go to the alphabetically first pair, so every run
    learns the same merges: the `tokenizers` trainer breaks ties in hash order, which
    changes from process to process, and gave a resumed training run token ids that its
    text encoder had not been trained on."""
    counts = Counter(words)
    spelled = {word: [*word[:-1], word[-1] + "</w>"] for word in counts}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in spelled.items():
            for pair in pairwise(symbols):
                pairs[pair] += counts[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in spelled.items():
            merged: list[str] = []
            for symbol in symbols:
                if merged and (merged[-1], symbol) == best:
                    merged[-1] += symbol
                else:
                    merged.append(symbol)
            spelled[word] = merged


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE as CLIP's, learned on the corpus until each of its words is one token;
    every byte also stands alone and word-final, so an unseen word never falls to <unk>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _merges([word.lower() for word in _CORPUS])
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    vocab = {token: index for index, token in enumerate(tokens)}
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer whose pieces are whole words (scored by how often the corpus
    has them) with single characters to fall back on: the unigram trainer, given so few
    words, splits the grammar's words into pieces that a tiny encoder learns more slowly."""
    counts: dict[str, int] = {}
    for word in _CORPUS:
        counts["▁" + word.lower()] = counts.get("▁" + word.lower(), 0) + 1
    total = sum(counts.values())
    characters = sorted(set("".join(_CORPUS).lower()) | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    vocab += [(piece, math.log(count / total)) for piece, count in sorted(counts.items())]
    vocab += [(char, -12.0) for char in characters if "▁" + char not in counts]
    unigram = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    unigram.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    pieces = [tuple(entry) for entry in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def embedded_tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """CLIP (byte-level BPE) and T5 (unigram) tokenizers trained on the scene grammar."""
    return _clip_tokenizer(), _t5_tokenizer()


@dataclass(frozen=True)
class EmbeddedShape:
    """The sizes of every component; `train` uses the shipped one, tests a smaller one."""

    hidden: int = 192
    heads: int = 6
    double_layers: int = 3
    single_layers: int = 3
    rope: tuple[int, int, int] = (4, 14, 14)
    text_dim: int = 64
    text_layers: int = 2
    vae_channels: tuple[int, int, int, int] = (16, 32, 64, 64)
    vae_groups: int = 8
    tiny_channels: int = 24


TINY_SHAPE = EmbeddedShape(
    hidden=32,
    heads=2,
    double_layers=1,
    single_layers=1,
    rope=(4, 6, 6),
    text_dim=16,
    text_layers=1,
    vae_channels=(8, 8, 16, 16),
    vae_groups=4,
    tiny_channels=8,
)


def flux_vae(
    block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int = 32
) -> AutoencoderKL:
    """FLUX's VAE shape: 16 latent channels, 8x downsampling, no quant convs. No attention in
    the mid-block, so that the cost stays linear in the pixels at any size."""
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
        mid_block_add_attention=False,
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


def tiny_vae(channels: int) -> AutoencoderTiny:
    """A TAEF1-shaped preview decoder; it reads the transformer's (scaled) latents."""
    return AutoencoderTiny(
        encoder_block_out_channels=(channels,) * 4,
        decoder_block_out_channels=(channels,) * 4,
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=16,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_embedded_pipeline(shape: EmbeddedShape = EmbeddedShape()) -> FluxPipeline:
    """The untrained pipeline: real FLUX classes at `shape`, with random weights."""
    clip_tokenizer, t5_tokenizer = embedded_tokenizers()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=shape.double_layers,
        num_single_layers=shape.single_layers,
        attention_head_dim=shape.hidden // shape.heads,
        num_attention_heads=shape.heads,
        joint_attention_dim=shape.text_dim,
        pooled_projection_dim=shape.text_dim,
        guidance_embeds=True,
        axes_dims_rope=shape.rope,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=shape.text_dim,
            intermediate_size=2 * shape.text_dim,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=shape.text_dim,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=shape.text_dim,
            d_kv=shape.text_dim // 4,
            d_ff=2 * shape.text_dim,
            num_layers=shape.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
    vae = flux_vae(shape.vae_channels, layers_per_block=1, norm_num_groups=shape.vae_groups)
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
    """The folder of the embedded model: the shipped one, or its Kontext twin.

    A Kontext model is FLUX's components under another pipeline class, so the twin is the
    same weights with another `model_index.json`, made once in the cache folder. It appears
    atomically (made in a temporary folder, then renamed), so that two processes starting
    together never load a half-written model.
    """
    if not kontext:
        return MODEL_DIR
    target = cache_dir / f"embedded-flux-kontext-v{EMBEDDED_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".embedded-", dir=cache_dir))
    try:
        shutil.copytree(MODEL_DIR, staging, dirs_exist_ok=True)
        index = json.loads((MODEL_DIR / "model_index.json").read_text())
        index["_class_name"] = "FluxKontextPipeline"
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
