"""Every knob of the server in one frozen object, from flags and `FLUXSTREAM_*` variables.

Precedence: command-line flag, then environment variable, then the default here. Each
limit and timeout is a named setting so that operators never have to edit code.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

_DEFAULT_CACHE = Path.home() / ".cache" / "fluxstream"
# Never echoed in an error message or a log line (a Redis url may hold a password).
SECRET_SETTINGS = frozenset({"api_keys", "webhook_secret", "redis_url"})


class ListVariables(EnvSettingsSource):
    """`FLUXSTREAM_*` variables, where a list may also be plain comma-separated text.

    pydantic-settings reads a list variable as JSON only, so `FLUXSTREAM_API_KEYS=sk-one`
    stopped start-up; people write lists in variables as `a` or `a,b`. Text that starts
    with `[` is still JSON. An empty variable is refused rather than read as no items: an
    unset `${KEYS}` in a compose file must not quietly turn API keys off.
    """

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        text = str(value).strip()
        if text.startswith("["):
            return super().decode_complex_value(field_name, field, value)
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError(f"{field_name} is empty")
        return items


def hostname_pid() -> str:
    """The default replica name: unique per process on a machine, and says where it runs."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        # The opening paragraph of `--help`, which prints it as it is.
        json_schema_extra={
            "description": "An OpenAI-compatible FLUX image server that streams previews.\n"
            "Every flag is also the environment variable shown after it; flags win.\n"
            "Optional limits take null for none. Lists are repeated flags; a list variable\n"
            "is comma-separated or JSON: FLUXSTREAM_API_KEYS=sk-a,sk-b or\n"
            """FLUXSTREAM_API_KEYS='["sk-a", "sk-b"]' ('[]' for none)."""
        },
        env_prefix="FLUXSTREAM_",
        frozen=True,
        cli_kebab_case=True,
        cli_prog_name="fluxstream",
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        # `null` turns off an optional limit from the environment as on the command line.
        env_parse_none_str="null",
    )

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, description="TCP port to listen on")
    model: str = Field(
        "embedded",
        description="'embedded' (the built-in tiny FLUX), 'embedded-kontext' (the same as a "
        "Kontext model), a local diffusers folder, or a hub id already in the local cache",
    )
    served_model_name: str = Field("flux.1-dev", description="model id clients ask for")
    model_aliases: tuple[str, ...] = Field(
        ("flux-dev", "flux.1-dev", "black-forest-labs/FLUX.1-dev"),
        description="other model ids accepted as the served model",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, float32 on CPU), bfloat16, ...")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="regional torch.compile of the transformer blocks (auto: on CUDA)"
    )
    compile_backend: str = Field("inductor", description="torch.compile backend")
    fuse_qkv: Literal["auto", "on", "off"] = Field(
        "auto", description="fuse attention QKV projections (auto: on CUDA)"
    )
    quantize: Literal["none", "fp8", "fp8-torchao"] = Field(
        "none",
        description="fp8: rowwise float8 linears in the transformer blocks; fp8-torchao: "
        "the same through torchao (CUDA only, needs torchao installed)",
    )
    offload: Literal["none", "model", "sequential"] = Field(
        "none", description="diffusers CPU offload, for GPUs too small for the model"
    )
    attention_backend: str | None = Field(
        None, description="diffusers attention backend (default: PyTorch SDPA's own choice)"
    )
    warmup: bool = Field(True, description="run one generation at start-up before serving")
    cache_dir: Path = Field(
        _DEFAULT_CACHE, description="embedded model, preview fits, compile caches"
    )
    data_dir: Path = Field(_DEFAULT_CACHE / "images", description="where url results live")
    public_base_url: str | None = Field(
        None, description="absolute base for result urls; default: the request's own host"
    )
    url_ttl_s: float = Field(3600.0, gt=0, description="how long url results stay served")

    max_queued: int = Field(16, ge=1, description="jobs waiting beyond which requests get 429")
    max_n: int = Field(10, ge=1, description="largest n per request")
    max_steps: int = Field(100, ge=1, description="largest num_inference_steps")
    max_pixels: int = Field(2048 * 2048, ge=1, description="pixel budget of one image")
    max_prompt_chars: int = Field(8000, ge=1, description="longest prompt accepted")
    max_image_bytes: int = Field(
        50 * 2**20, ge=1, description="largest input image or mask file of an edit (413 over it)"
    )
    max_input_pixels: int = Field(
        50_000_000, ge=1, description="largest input image or mask, in pixels, before decoding"
    )
    max_partial_images: int = Field(
        3,
        ge=0,
        description="most previews per request (OpenAI allows 3; more, up to one per step, "
        "is an extension)",
    )
    preview_max_side: int = Field(512, ge=16, description="long side of preview images")
    safety_checker_model: Path | None = Field(
        None,
        description="local image-classification model folder (transformers) that checks "
        "every output; none: no checker",
    )
    safety_checker_labels: tuple[str, ...] = Field(
        ("nsfw",), description="labels of that model that flag an image"
    )
    safety_checker_threshold: float = Field(
        0.5, ge=0, le=1, description="probability of a flagged label at which an image is withheld"
    )
    safety_checker_default: bool = Field(
        True, description="check images when the request does not say (if a checker is loaded)"
    )
    safety_checker_optional: bool = Field(
        True, description="whether a request may turn the safety checker off"
    )
    preview_decoder: Literal["auto", "linear", "vae", "tiny"] = Field(
        "auto",
        description="previews of requests without a 'preview' field "
        "(auto: tiny when --preview-tiny-vae is given, else linear)",
    )
    preview_tiny_vae: Path | None = Field(
        None, description="local diffusers folder of a tiny VAE (TAEF1) for preview 'tiny'"
    )
    lora_dir: Path | None = Field(
        None,
        description="folder of LoRA files (.safetensors) that requests may name in 'loras'; "
        "none: LoRA fields are refused",
    )
    lora_cache: int = Field(
        4,
        ge=1,
        description="LoRAs kept loaded (least recently used dropped); also the most "
        "one request may name",
    )
    lora_max_rank: int = Field(
        64,
        ge=1,
        description="compiled model: the rank its LoRA slot holds, summed over one request's "
        "LoRAs (switching LoRAs never recompiles)",
    )
    lora_max_bytes: int = Field(2 * 2**30, ge=1, description="largest LoRA file read, in bytes")
    keepalive_s: float = Field(15.0, gt=0, description="seconds between SSE keep-alive comments")
    sweep_interval_s: float = Field(
        60.0, gt=0, description="seconds between sweeps of expired files and jobs"
    )

    job_ttl_s: float = Field(
        3600.0, gt=0, description="how long finished jobs (and their files) are kept"
    )
    job_event_buffer: int = Field(
        64, ge=1, description="events kept per job for resuming browsers (Last-Event-ID)"
    )
    job_lease_s: float = Field(
        10.0,
        gt=0,
        description="with Redis: an unfinished job whose replica stopped renewing it this long"
        " is failed",
    )
    webhook_allowed_hosts: tuple[str, ...] = Field(
        (), description="hosts a job's webhook_url may name; empty: webhooks are refused"
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="timeout of one webhook attempt")
    webhook_attempts: int = Field(3, ge=1, description="webhook attempts before giving up")
    webhook_backoff_s: float = Field(
        1.0, ge=0, description="wait before the second attempt; doubles after each"
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="signs webhooks the Standard Webhooks way (webhook-signature); "
        "'whsec_' + base64 as those libraries expect, or any other text used as is",
    )
    max_queue_wait_s: float | None = Field(
        600.0, gt=0, description="queued longer than this: 503 (or an error event); null: no limit"
    )
    max_run_s: float | None = Field(
        None, gt=0, description="a job running longer than this is stopped; null: no limit"
    )
    max_batch_size: int = Field(
        1,
        ge=1,
        description="images per pipeline call when compatible queued text-to-image requests "
        "run together; 1: no batching",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long accepted jobs may still run"
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="largest request body, counted as it arrives"
    )
    api_keys: tuple[str, ...] = Field(
        (), description="keys accepted as 'Authorization: Bearer <key>' on /v1/*; none: open"
    )
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one per line (# starts a comment)"
    )
    cors_allow_origins: tuple[str, ...] = Field(
        (), description="origins allowed to call the API from a browser; none: CORS off"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="of the server's own loggers and uvicorn's"
    )

    state_store: Literal["local", "redis"] = Field(
        "local", description="where url results and jobs live: local disk/process, or Redis"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="with state_store=redis")
    redis_prefix: str = Field("fluxstream", description="key prefix in Redis")
    replica_name: str = Field(
        default_factory=hostname_pid,
        description="names this process in the x-fluxstream-replica header; default: <host>-<pid>",
    )
    replicas: int = Field(2, ge=1, description="serve-cluster: Ray Serve replicas")
    autoscale_min_replicas: int = Field(1, ge=0, description="serve-cluster autoscaling floor")
    autoscale_max_replicas: int | None = Field(
        None, ge=1, description="serve-cluster: set to autoscale instead of fixed replicas"
    )
    autoscale_target_ongoing: float = Field(
        2.0, gt=0, description="serve-cluster: ongoing requests per replica to aim for"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual sources, with list variables read by `ListVariables`."""
        return init_settings, ListVariables(settings_cls), dotenv_settings, file_secret_settings

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The served name, then its aliases, each once: the default aliases repeat the
        default name, and `/v1/models` must not list an id twice."""
        return tuple(dict.fromkeys((self.served_model_name, *self.model_aliases)))

    @property
    def webhook_key(self) -> bytes | None:
        """The HMAC key of `webhook_secret`."""
        return None if self.webhook_secret is None else _signing_key(self.webhook_secret)

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_is_usable(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            _signing_key(secret)
        return secret


def _signing_key(secret: SecretStr) -> bytes:
    """`whsec_` + base64 is the Standard Webhooks form; any other text is the key as is."""
    text = secret.get_secret_value()
    if not text.startswith("whsec_"):
        return text.encode()
    try:
        return base64.b64decode(text.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("a 'whsec_' secret must be base64 after its prefix") from None
