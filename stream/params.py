"""Request models, and their normalization into a fully resolved engine `Job`.

Each field of the FLUX.1 [dev] reference is handled as its "Parameter Normalization" table
says: passed through, renamed (`cfg_scale` -> FLUX's distilled `guidance_scale`), converted
(`size`, `aspect_ratio`, `resolution` -> pixels) or emulated (`n`, `response_format`,
`sync_mode`, `quality`); unknown fields go through `stream.passthrough`. `null` always means
"use the default"; multipart strings ("3", "true", "0.8") are coerced by the same model, so
the edits endpoint subclasses `ImageGenerationRequest` and calls `plan_generation` too.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from pipeline.jobs import Acceleration, EditInputs, Job, LoraRef, ModelProfile
from stream.errors import InvalidRequest, NotFound
from stream.loras import LoraFolder
from stream.passthrough import split_extras
from stream.settings import Settings
from stream.sizes import SizeRequest, generation_size, resolve_size

OutputFormat = Literal["png", "jpeg", "webp", "gif", "avif"]
ResponseFormat = Literal["url", "b64_json"]
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
# `quality` as a share of the model's default steps; `standard` and `hd` are DALL-E 3's names,
# `xhigh` and `max` newer GPT image names: the model's default steps are already its best.
QUALITY_STEPS: dict[str, tuple[str, float]] = {
    "low": ("low", 0.5),
    "medium": ("medium", 0.75),
    "standard": ("medium", 0.75),
    "high": ("high", 1.0),
    "hd": ("high", 1.0),
    "xhigh": ("high", 1.0),
    "max": ("high", 1.0),
    "auto": ("high", 1.0),
}
MAX_SEED = 2**32 - 1
# img2img keeps the input's layout and colours; inpainting paints the masked area anew.
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
_T = TypeVar("_T")


def _number_as_text(value: object) -> object:
    """The reference types `megapixels` and `resolution` as strings ("1", "0.25"), but a
    client that sends the number 1 means the same thing."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


TierText = Annotated[str, BeforeValidator(_number_as_text)]


def _not_a_boolean(value: object) -> object:
    """JSON `true` is not a number, as OpenAI answers; pydantic would take it as 1."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "Input should be a number, not a boolean")
    return value


Integer = Annotated[int, BeforeValidator(_not_a_boolean)]
Number = Annotated[float, BeforeValidator(_not_a_boolean)]


def _json_text(value: object) -> object:
    """A multipart form sends `loras` as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise PydanticCustomError("json_invalid", "Input should be a JSON list") from None
    return value


class LoraItem(BaseModel):
    """fal's form of one LoRA: a file or folder inside the server's `--lora-dir`."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a LoRA's name, as GET /v1/loras lists it")
    scale: Number | None = Field(None, ge=-4, le=4, description="its weight (default 1)")


_R = TypeVar("_R", bound="ImageGenerationRequest")


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus the reference's extensions."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)

    prompt: str = Field(description="Required. Text prompt for image generation")
    model: str | None = Field(None, description="served model id or alias")
    n: Integer | None = Field(None, description="number of images (default 1)")
    size: str | None = Field(None, description="'WxH', 'W:H' or 'auto'")
    aspect_ratio: str | None = Field(None, description="shape, mapped to the nearest supported")
    resolution: TierText | None = Field(None, description="tier: 0.5K, 1K, 2K, 4K or megapixels")
    megapixels: TierText | None = Field(None, description="megapixel tier, e.g. '0.25' or '1'")
    seed: Integer | None = Field(None, ge=0, le=MAX_SEED, description="seed of the first image")
    num_inference_steps: Integer | None = Field(None, description="denoising steps")
    cfg_scale: Number | None = Field(None, description="renamed to FLUX's guidance_scale")
    guidance_scale: Number | None = Field(None, description="FLUX's distilled guidance")
    response_format: ResponseFormat | None = Field(None, description="url (default) or b64_json")
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg, ...")
    output_compression: Integer | None = Field(None, ge=0, le=100, description="lossy quality")
    output_quality: Integer | None = Field(None, ge=0, le=100, description="lossy quality")
    stream: bool | None = Field(None, description="stream partial images as SSE")
    partial_images: Integer | None = Field(None, description="previews to stream (0..3)")
    preview: str | None = Field(None, description="preview decoder: linear, vae or tiny")
    sync_mode: bool | None = Field(None, description="url results as data: URIs, nothing stored")
    strength: Number | None = Field(None, ge=0, le=1, description="edits only; no effect on T2I")
    acceleration: Acceleration | None = Field(None, description="none, regular or high")
    go_fast: bool | None = Field(None, description="fp8 + compile, or the nearest speed-up")
    enable_safety_checker: bool | None = Field(None, description="fal's name")
    disable_safety_checker: bool | None = Field(None, description="Replicate's name")
    quality: Quality | None = Field(None, description="step preset: low, medium, high, auto")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="accepted; FLUX images are always opaque"
    )
    style: Literal["vivid", "natural"] | None = Field(None, description="accepted; no effect")
    user: str | None = Field(None, description="deprecated end-user id: safety_identifier")
    safety_identifier: str | None = Field(None, description="end-user id; echoed, not used")
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted; no effect")
    loras: Annotated[list[LoraItem] | None, BeforeValidator(_json_text)] = Field(
        None, description="LoRAs from the server's --lora-dir, with scales (fal's form)"
    )
    lora_weights: str | None = Field(None, description="Replicate's LoRA: added to loras")
    lora_scale: Number | None = Field(None, ge=-1, le=3, description="lora_weights' scale")
    extra_lora: str | None = Field(None, description="Replicate's second LoRA")
    extra_lora_scale: Number | None = Field(None, ge=-1, le=3, description="extra_lora's scale")


class ImageEditRequest(ImageGenerationRequest):
    """`POST /v1/images/edits`: every generation field, plus the edit's own (the images and
    the mask travel beside it, see `stream.uploads`)."""

    input_fidelity: str | None = Field(None, description="OpenAI input_fidelity; accepted")


@dataclass(frozen=True)
class ImagePlan:
    """A request after normalization: the engine job plus how to answer the client."""

    job: Job
    size: tuple[int, int]
    model: str
    response_format: ResponseFormat
    output_format: OutputFormat
    quality: int | None
    stream: bool
    partial_images: int
    sync_mode: bool = False
    quality_name: str = "high"
    ignored_parameters: tuple[str, ...] = ()
    safety_identifier: str | None = None

    @property
    def size_text(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"


def parse_generation_request(body: Any) -> ImageGenerationRequest:
    return parse_request(body, ImageGenerationRequest)


def parse_request(body: Any, model: type[_R]) -> _R:
    """Validate a JSON object, or a multipart form's fields (all strings), into `model`:
    `ImageGenerationRequest` or a subclass of it such as the edits request."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise _invalid(error) from None


def _invalid(error: ValidationError) -> InvalidRequest:
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "missing":
        return InvalidRequest(f"missing required parameter: {param}", param=param)
    return InvalidRequest(f"invalid value for {param}: {first['msg']}", param=param)


def plan_generation(
    request: ImageGenerationRequest,
    settings: Settings,
    profile: ModelProfile,
    like: tuple[int, int] | None = None,
) -> ImagePlan:
    """The plan of a request; `like` is an edit's input size (see `resolve_size`)."""
    model = _check_model(request.model, settings)
    if not request.prompt.strip():
        raise InvalidRequest("prompt must not be empty", param="prompt")
    _check_text_length(request.prompt, "prompt", settings)
    n = _in_range(request.n, 1, 1, settings.max_n, "n")
    stream = bool(request.stream)
    if stream and n > 1:
        raise InvalidRequest("streaming supports only n=1", param="n")
    partial_images = _in_range(
        request.partial_images, 0, 0, settings.max_partial_images, "partial_images"
    )
    quality_name, steps = _steps(request, settings, profile)
    guidance = _first_given(request.cfg_scale, request.guidance_scale)
    if guidance is None:
        guidance = profile.default_guidance
    if not 0 <= guidance <= 100:
        param = "cfg_scale" if request.cfg_scale is not None else "guidance_scale"
        raise InvalidRequest(f"{param} must be between 0 and 100", param=param)
    size = resolve_size(
        SizeRequest(request.size, request.aspect_ratio, request.resolution, request.megapixels),
        settings.max_pixels,
        like,
        default=profile.default_size,
    )
    width, height = generation_size(*size)
    first_seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    extras = split_extras(request.model_extra or {}, profile.pipeline_parameters)
    loras, unused = plan_loras(request, settings, profile)
    for name, value in extras.pipeline_kwargs.items():
        if isinstance(value, str):  # prompt_2, negative_prompt: tokenized like the prompt
            _check_text_length(value, name, settings)
    job = Job(
        prompt=request.prompt,
        width=width,
        height=height,
        seeds=tuple((first_seed + i) % (MAX_SEED + 1) for i in range(n)),
        num_inference_steps=steps,
        guidance_scale=guidance,
        partial_images=partial_images if stream else 0,
        preview_size=preview_size(size, settings.preview_max_side),
        pipeline_kwargs=extras.pipeline_kwargs,
        acceleration=request.acceleration or "none",
        go_fast=bool(request.go_fast),
        safety_check=safety_check(request, settings, profile),
        preview_decoder=_preview_decoder(request.preview, settings, profile),
        loras=loras,
    )
    return ImagePlan(
        job=job,
        size=size,
        model=model,
        response_format=request.response_format or "url",
        output_format=request.output_format or "png",
        quality=_first_given(request.output_quality, request.output_compression),
        stream=stream,
        partial_images=job.partial_images,
        sync_mode=bool(request.sync_mode),
        quality_name=quality_name,
        ignored_parameters=tuple(sorted((*extras.ignored, *unused))),
        safety_identifier=request.safety_identifier or request.user or None,
    )


def plan_loras(
    request: ImageGenerationRequest, settings: Settings, profile: ModelProfile
) -> tuple[tuple[LoraRef, ...], tuple[str, ...]]:
    """The request's LoRAs as one list: `loras` (fal), then `lora_weights` and `extra_lora`
    (Replicate, converted), each checked in the LoRA folder; and the scale fields given
    without their LoRA, which are reported as ignored."""
    asked = [
        (item.path, item.scale, f"loras.{i}.path") for i, item in enumerate(request.loras or [])
    ]
    unused = []
    for name, scale, param, scale_param in (
        (request.lora_weights, request.lora_scale, "lora_weights", "lora_scale"),
        (request.extra_lora, request.extra_lora_scale, "extra_lora", "extra_lora_scale"),
    ):
        if name is not None:
            asked.append((name, scale, param))
        elif scale is not None:
            unused.append(scale_param)
    if settings.lora_dir is None:
        if asked or unused:
            param = asked[0][2].split(".")[0] if asked else unused[0]
            raise InvalidRequest(
                "this server has no LoRAs (it was started without --lora-dir)",
                param=param,
                code="loras_not_supported",
            )
        return (), ()
    if len(asked) > settings.lora_cache:
        raise InvalidRequest(
            f"at most {settings.lora_cache} LoRAs per request; got {len(asked)}", param="loras"
        )
    folder = LoraFolder(settings.lora_dir, settings.lora_max_bytes)
    refs = []
    for name, scale, param in asked:
        found = folder.resolve(name, param)
        if profile.lora_max_rank is not None and (found.rank or 0) > profile.lora_max_rank:
            raise InvalidRequest(
                f"the LoRA {name!r} has rank {found.rank}; this compiled server's LoRAs may "
                f"have rank {profile.lora_max_rank} at most (--lora-max-rank)",
                param=param,
                code="invalid_lora",
            )
        version = (found.size, found.mtime_ns)
        refs.append(LoraRef(name, str(found.path), 1.0 if scale is None else scale, version))
    return tuple(refs), tuple(unused)


def _steps(
    request: ImageGenerationRequest, settings: Settings, profile: ModelProfile
) -> tuple[str, int]:
    """`num_inference_steps` wins; else `quality` picks a share of the model's default."""
    name, share = QUALITY_STEPS[request.quality or "auto"]
    if request.num_inference_steps is None:
        return name, max(1, min(settings.max_steps, round(profile.default_steps * share)))
    steps = _in_range(request.num_inference_steps, 0, 1, settings.max_steps, "num_inference_steps")
    return name, steps


def safety_check(
    request: ImageGenerationRequest, settings: Settings, profile: ModelProfile
) -> bool:
    """Whether to check this request's images: the server's default unless the request says
    otherwise, and a request may turn the check off only where the server allows it."""
    asked = _first_given(
        request.enable_safety_checker,
        None if request.disable_safety_checker is None else not request.disable_safety_checker,
    )
    param = (
        "enable_safety_checker"
        if request.enable_safety_checker is not None
        else "disable_safety_checker"
    )
    if asked is None:
        return profile.safety_checker and settings.safety_checker_default
    if asked and not profile.safety_checker:
        raise InvalidRequest(
            "this server has no safety checker configured (see --safety-checker-model)",
            param=param,
        )
    if not asked and profile.safety_checker and not settings.safety_checker_optional:
        raise InvalidRequest(
            "this server does not allow turning the safety checker off", param=param
        )
    return asked


def plan_edit(
    request: ImageEditRequest, inputs: EditInputs, settings: Settings, profile: ModelProfile
) -> ImagePlan:
    """A generation plan sized after the first input image, carrying the edit's inputs."""
    plan = plan_generation(request, settings, profile, like=inputs.images[0].size)
    if request.strength is not None:
        strength = request.strength
    else:
        strength = DEFAULT_INPAINT_STRENGTH if inputs.mask is not None else DEFAULT_STRENGTH
    edit = dataclasses.replace(inputs, strength=strength)
    return dataclasses.replace(plan, job=dataclasses.replace(plan.job, edit=edit))


def preview_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The output's shape, scaled down so that its long side is at most `max_side`."""
    factor = min(1.0, max_side / max(size))
    return (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))


def _preview_decoder(preview: str | None, settings: Settings, profile: ModelProfile) -> str:
    """The request's decoder, else the server's; `auto` is the model's choice (see
    `ModelProfile.auto_preview`)."""
    decoder = settings.preview_decoder if preview is None else preview
    if decoder == "auto":
        decoder = profile.auto_preview
    if decoder not in profile.preview_decoders:
        choices = ", ".join(profile.preview_decoders)
        raise InvalidRequest(f"preview must be one of {choices}; got {decoder!r}", param="preview")
    return decoder


def _check_text_length(text: str, param: str, settings: Settings) -> None:
    """Tokenizing runs on the engine's one worker: a text of megabytes would hold it for
    minutes, so every text the pipeline reads is held to `max_prompt_chars`."""
    if len(text) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"{param} is longer than {settings.max_prompt_chars} characters", param=param
        )


def _check_model(model: str | None, settings: Settings) -> str:
    if model is None or model in settings.model_ids:
        return settings.served_model_name
    raise NotFound(
        f"the model {model!r} does not exist; this server serves {settings.served_model_name!r}",
        param="model",
        code="model_not_found",
    )


def _in_range(value: int | None, default: int, low: int, high: int, param: str) -> int:
    if value is None:
        return default
    if not low <= value <= high:
        raise InvalidRequest(f"{param} must be between {low} and {high}; got {value}", param=param)
    return value


def _first_given(*values: _T | None) -> _T | None:
    """The first value that is not None: the documented precedence of synonym fields."""
    return next((value for value in values if value is not None), None)
