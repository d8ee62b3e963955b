"""The linear preview map: the one a model ships, else fitted and cached on disk per VAE
so that a restart reuses it.

A VAE folder may carry its own map (`vae/latent_rgb.json`, the role of ComfyUI's
`latent_rgb_factors`), fitted by whoever trained the VAE on the pictures it was trained
for: the embedded model's training writes one, from a read-out trained with its VAE, and
its previews are 2-5 dB nearer the final image than with a map fitted to synthetic
pictures. Otherwise the map is fitted here.

The key is a hash of what decides the fit: the VAE's configuration (without the
`_`-prefixed bookkeeping such as its folder path, so a moved model still hits) and a
fingerprint of its weights (per tensor: shape, sum and absolute sum, rounded), plus the
fit's own version. Hashing sums rather than every byte costs one pass over the weights
on their device. A missing or unreadable entry is refitted and rewritten atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from pipeline.previews import LinearPreviewDecoder, fit_linear_decoder

logger = logging.getLogger(__name__)

# Bump when `fit_linear_decoder` changes, so that old fits are not reused.
FIT_VERSION = "1"
# In a model folder: pipeline-space latents to RGB in [0, 1], as `LinearPreviewDecoder.as_dict`.
SHIPPED_MAP = Path("vae") / "latent_rgb.json"


def linear_decoder(vae: AutoencoderKL, cache_dir: Path) -> LinearPreviewDecoder:
    """The map the model ships beside its VAE's weights when it is readable, else
    `cached_linear_decoder`. The VAE's config names the folder it was loaded from: a local
    model's, the embedded model's cache, or a hub id's snapshot in the local cache."""
    folder = vae.config.get("_name_or_path")
    shipped = Path(folder) / SHIPPED_MAP.name if folder else None
    if shipped is not None and shipped.is_file():
        try:
            return LinearPreviewDecoder.from_dict(json.loads(shipped.read_text()))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            logger.warning("unreadable %s (%s); fitting a map instead", SHIPPED_MAP, error)
    return cached_linear_decoder(vae, cache_dir)


@torch.no_grad()
def vae_fingerprint(vae: AutoencoderKL) -> str:
    """A stable hex key of the VAE's configuration and weights."""
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    digest = hashlib.sha256(f"fit-v{FIT_VERSION}".encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        values = tensor.double()
        stats = torch.stack([values.sum(), values.abs().sum()]).tolist()
        digest.update(f"{name}{tuple(tensor.shape)}{stats[0]:.6e}{stats[1]:.6e}".encode())
    return digest.hexdigest()[:32]


def cached_linear_decoder(vae: AutoencoderKL, cache_dir: Path) -> LinearPreviewDecoder:
    """The linear map of `vae`, from `cache_dir/previews/` if fitted before, else fitted now."""
    path = cache_dir / "previews" / f"linear-{vae_fingerprint(vae)}.json"
    try:
        return LinearPreviewDecoder.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        logger.info("fitting the linear preview map (cached as %s)", path.name)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        logger.warning("unreadable preview fit %s; fitting it again", path)
    decoder = fit_linear_decoder(vae)
    try:
        _write_atomically(path, decoder.as_dict())
    except OSError as error:
        # A read-only cache costs a refit at each start, never the start itself.
        logger.warning("cannot cache the preview fit in %s: %s", path.parent, error.strerror)
    return decoder


def _write_atomically(path: Path, content: dict[str, object]) -> None:
    """Two servers starting together never read a half-written file; a failed write
    leaves no staging file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".fit-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(content, file)
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise
