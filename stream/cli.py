"""`python -m stream` / `fluxstream`: load the model, then serve the app with uvicorn.

This is the composition root, the one place on the HTTP side that reaches into the model
side's loader; it imports it lazily so that `import stream.app` never loads torch.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from pipeline.jobs import ImageEngine
from stream.app import create_app
from stream.auth import load_api_keys
from stream.logs import RedactQuerySecrets, configure_logging
from stream.settings import SECRET_SETTINGS, Settings
from stream.shutdown import DrainingServer
from stream.sizes import default_generation_size

# After the engine is done: how long the last results may take to be encoded, stored and
# sent (a stream following a job on another replica would otherwise hold the drain).
FLUSH_TIMEOUT_S = 30
# After the drain, streams have ended; this only bounds a connection that will not close.
SHUTDOWN_TIMEOUT_S = 10
logger = logging.getLogger(__name__)


def load_settings(argv: list[str] | None = None) -> Settings:
    return Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)


class StartupError(Exception):
    """The server cannot start; the message says why in one line."""


def build_engine(settings: Settings) -> ImageEngine:
    """Load the model and its checker as `settings` say; raises `StartupError`."""
    if settings.preview_decoder == "tiny" and settings.preview_tiny_vae is None:
        raise StartupError("--preview-decoder tiny needs --preview-tiny-vae")
    if settings.lora_dir is not None and not settings.lora_dir.is_dir():
        raise StartupError(f"--lora-dir {settings.lora_dir} is not a folder")
    # transformers announces at import time that torchvision is missing; it is not needed.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        load_api_keys(settings)
    except OSError as error:
        raise StartupError(
            f"cannot read the API keys file {settings.api_keys_file}: {error.strerror}"
        ) from None
    from pipeline.factory import create_flux_engine
    from pipeline.loading import ModelLoadError, ModelSpec
    from pipeline.loras import LoraSpec
    from pipeline.safety import SafetyCheckerLoadError, SafetySpec
    from pipeline.speedups import Speedups

    spec = ModelSpec(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,
        offload=settings.offload,
        speedups=Speedups(
            compile=settings.compile,
            compile_backend=settings.compile_backend,
            fuse_qkv=settings.fuse_qkv,
            quantize=settings.quantize,
            attention_backend=settings.attention_backend,
        ),
        tiny_vae=settings.preview_tiny_vae,
        loras=None
        if settings.lora_dir is None
        else LoraSpec(
            cache=settings.lora_cache,
            max_rank=settings.lora_max_rank,
            max_bytes=settings.lora_max_bytes,
        ),
    )
    safety = (
        SafetySpec(
            model=settings.safety_checker_model,
            labels=settings.safety_checker_labels,
            threshold=settings.safety_checker_threshold,
        )
        if settings.safety_checker_model is not None
        else None
    )
    try:
        return create_flux_engine(
            spec,
            max_queued=settings.max_queued,
            warmup_size=(
                (lambda profile: default_generation_size(settings.max_pixels, profile.default_size))
                if settings.warmup
                else None
            ),
            safety=safety,
            max_queue_wait_s=settings.max_queue_wait_s,
            max_run_s=settings.max_run_s,
            max_batch_size=settings.max_batch_size,
        )
    except (ModelLoadError, SafetyCheckerLoadError) as error:
        raise StartupError(str(error)) from None


def settings_problems(error: ValidationError) -> str:
    """Each rejected setting as its flag, its variable and the value given (not for a
    secret, since this line ends up in logs), on one line."""
    problems = []
    for problem in error.errors():
        name = str(problem["loc"][0])  # the setting, not the index of a list item in it
        message = problem["msg"][:1].lower() + problem["msg"][1:]
        given = "" if name in SECRET_SETTINGS else f" {problem['input']!r}"
        problems.append(f"--{name.replace('_', '-')} (FLUXSTREAM_{name.upper()}){given}: {message}")
    return "; ".join(problems)


def unparsed_variable(error: SettingsError) -> str:
    """A list variable that is empty or broken JSON makes pydantic-settings raise, with a
    traceback; this says which variable and what it takes, without its value."""
    found = re.search(r'field "(\w+)"', str(error))
    if found is None:
        return str(error)
    return (
        f"FLUXSTREAM_{found[1].upper()} is not a list: give comma-separated values (a,b) "
        """or JSON ('["a", "b"]', '[]' for none)"""
    )


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValidationError as error:
        print(f"fluxstream: {settings_problems(error)}", file=sys.stderr)
        return 2
    except SettingsError as error:
        print(f"fluxstream: {unparsed_variable(error)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        engine = build_engine(settings)
    except StartupError as error:
        print(f"fluxstream: {error}", file=sys.stderr)
        return 2
    app = create_app(settings, engine)
    print(
        f"fluxstream: serving {settings.served_model_name} ({settings.model}) "
        f"at http://{settings.host}:{settings.port}",
        file=sys.stderr,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
    )
    # After uvicorn.Config, which sets up uvicorn's loggers (and keeps their filters).
    logging.getLogger("uvicorn.access").addFilter(RedactQuerySecrets())

    async def drain() -> None:
        await engine.aclose(settings.shutdown_grace_s)
        if not await app.state.in_flight.wait_idle(FLUSH_TIMEOUT_S):
            logger.warning("stopping with answers still in flight")

    DrainingServer(config, drain=drain).run()
    return 0
