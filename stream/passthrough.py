"""Parameters the server does not know: passed to the pipeline when safe, else reported.

The reference says unrecognized parameters "pass straight through" so that provider options
still work. For a local diffusers pipeline that means: a scalar whose name is a keyword of
the loaded pipeline's `__call__` goes into `Job.pipeline_kwargs`, unless the keyword is one
that the server sets itself or that carries tensors, callbacks or output plumbing. Anything
else is ignored and listed back to the client, so a typo never goes unnoticed and never
becomes a 500.

Keywords whose meaning we know are coerced and range-checked here (a multipart form sends
"512", not 512), so that a bad value is a 400 naming it rather than a failed job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stream.errors import InvalidRequest

Scalar = str | int | float | bool

# Set by the server from its own fields, or not plain data: never taken from a request.
_RESERVED = frozenset(
    {
        "self",
        "prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "num_images_per_prompt",
        "generator",
        "latents",
        "output_type",
        "return_dict",
        "timesteps",
        "sigmas",
        "joint_attention_kwargs",
        "image",
        "mask_image",
        "control_image",
        "strength",
    }
)
_RESERVED_PARTS = ("callback", "_embeds", "ip_adapter", "latents")


@dataclass(frozen=True)
class _Known:
    """How to coerce and check a keyword of FLUX pipelines that we know the meaning of."""

    convert: Callable[[Scalar], Scalar]
    low: float | None = None
    high: float | None = None


def _text(value: Scalar) -> Scalar:
    return str(value)


def _integer(value: Scalar) -> Scalar:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _number(value: Scalar) -> Scalar:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


KNOWN: Mapping[str, _Known] = {
    "prompt_2": _Known(_text),
    "negative_prompt": _Known(_text),
    "negative_prompt_2": _Known(_text),
    "true_cfg_scale": _Known(_number, 0, 100),
    "max_sequence_length": _Known(_integer, 1, 512),
}


@dataclass(frozen=True)
class Passthrough:
    """The outcome for the extra fields of one request."""

    pipeline_kwargs: Mapping[str, Scalar]
    ignored: tuple[str, ...]


def is_forwardable(name: str, pipeline_parameters: frozenset[str]) -> bool:
    """Whether a request may set pipeline keyword `name` directly."""
    return (
        name in pipeline_parameters
        and name not in _RESERVED
        and not any(part in name for part in _RESERVED_PARTS)
    )


def split_extras(extras: Mapping[str, object], pipeline_parameters: frozenset[str]) -> Passthrough:
    """Forward what the pipeline accepts; list the rest (sorted) as ignored.

    A `null` extra means "default", like every other field, so it is neither forwarded nor
    reported.
    """
    forwarded: dict[str, Scalar] = {}
    ignored: list[str] = []
    for name, value in extras.items():
        if value is None:
            continue
        if isinstance(value, Scalar) and is_forwardable(name, pipeline_parameters):
            forwarded[name] = _checked(name, value)
        else:
            ignored.append(name)
    return Passthrough(pipeline_kwargs=forwarded, ignored=tuple(sorted(ignored)))


def _checked(name: str, value: Scalar) -> Scalar:
    known = KNOWN.get(name)
    if known is None:
        return value
    try:
        converted = known.convert(value)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"invalid value for {name}: {value!r} is not a valid {known.convert.__name__[1:]}",
            param=name,
        ) from None
    if isinstance(converted, int | float) and not _within(converted, known):
        raise InvalidRequest(
            f"{name} must be between {known.low:g} and {known.high:g}; got {converted}",
            param=name,
        )
    return converted


def _within(value: float, known: _Known) -> bool:
    return (known.low is None or value >= known.low) and (known.high is None or value <= known.high)
