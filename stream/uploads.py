"""Request bodies: JSON, and the edit endpoint's multipart form or JSON with data URLs.

Multipart is read as the official SDKs send it: one file as `image`, a list as repeated
`image[]` (repeated `image` works too), an optional `mask`, and every other field a
string that the request model coerces ("3", "true", "0.8"). The JSON variant carries
`images: [{"image_url": "data:..."}]` and `mask: {"image_url": ...}`; remote URLs are
refused, because the server fetches nothing.

The body as a whole is held to `max_body_bytes` as it arrives (`stream.limits`); each file
in it is held to `max_image_bytes`, counted on the bytes received (413 either way).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from stream.errors import InvalidRequest, PayloadTooLarge
from stream.settings import Settings

MAX_IMAGE_PARTS = 16  # the most images the SDKs send in one request
MAX_FIELDS = 100
IMAGE_PARTS = ("image", "image[]")
_DATA_URL = re.compile(r"^data:[^,;]*(?:;[^,;]*)*;base64,(.*)$", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class EditUpload:
    """An edit request as received: its scalar fields, and its files still undecoded."""

    fields: dict[str, Any]
    images: tuple[bytes, ...]
    mask: bytes | None


async def read_json(request: Request) -> object:
    """The body as JSON. Besides syntax errors, the parser refuses integers of thousands of
    digits (ValueError) and arrays nested thousands deep (RecursionError): a 400 too."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        sent_as = request.headers.get("content-type", "").split(";")[0].strip().lower()
        hint = "" if sent_as in ("", "application/json") else f" (it was sent as {sent_as})"
        raise InvalidRequest(f"the request body is not valid JSON{hint}") from None
    _check_unicode(body)
    return body


def _check_unicode(body: object) -> None:
    """JSON's `\\ud83d` escapes can spell half a character (JavaScript cuts emoji in two when
    it truncates a string); no tokenizer or UTF-8 encoder takes such text, so it is a 400
    here, naming the top-level field it is in, rather than a failed job later."""
    fields = body.items() if isinstance(body, dict) else [(None, body)]
    for name, value in fields:
        param = name if _is_unicode(name) else None
        if param != name or not _is_unicode(value):
            raise InvalidRequest(
                f"{param or 'a field name'} has text that is not valid Unicode: a lone "
                "surrogate such as \\ud83d without its pair",
                param=param,
            )


def _is_unicode(value: object) -> bool:
    """Whether every string in `value`, keys included, encodes as UTF-8 (iterative: a body
    may nest as deep as the JSON parser allows)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


async def read_edit_upload(request: Request, settings: Settings) -> EditUpload:
    """The edit request's fields and files, from multipart or JSON, within the byte limit."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, settings.max_image_bytes)
    return _from_json(await read_json(request), settings.max_image_bytes)


async def _read_multipart(request: Request, max_image_bytes: int) -> EditUpload:
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    async with request.form(max_files=MAX_IMAGE_PARTS + 1, max_fields=MAX_FIELDS) as form:
        for name, value in form.multi_items():
            if name in IMAGE_PARTS:
                images.append(await _part_bytes(value, "image", max_image_bytes))
            elif name == "mask":
                mask = await _part_bytes(value, "mask", max_image_bytes)
            elif isinstance(value, str):
                fields[name] = value
            else:
                # The SDKs also send `markup` as a file: say what is read, not just "no".
                raise InvalidRequest(
                    f"{name} is not supported as a file: this server reads only the files "
                    "image (or image[]) and mask",
                    param=name,
                )
    return EditUpload(fields=fields, images=tuple(images), mask=mask)


async def _part_bytes(value: UploadFile | str, param: str, max_bytes: int) -> bytes:
    """A file part's bytes; a text part is taken as an image URL (a data URL)."""
    if isinstance(value, str):
        return _url_bytes(value, param, max_bytes)
    if value.size is not None and value.size > max_bytes:
        raise _file_too_large(param, max_bytes)
    return _within(await value.read(), param, max_bytes)


def _from_json(body: object, max_image_bytes: int) -> EditUpload:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object or multipart/form-data")
    fields = dict(body)
    images = fields.pop("images", None)
    mask = fields.pop("mask", None)
    if images is None:
        raise InvalidRequest("missing required parameter: images", param="images")
    if not isinstance(images, list):
        raise InvalidRequest(
            'images must be a list of objects like {"image_url": "data:image/png;base64,..."}',
            param="images",
        )
    if len(images) > MAX_IMAGE_PARTS:
        raise InvalidRequest(f"at most {MAX_IMAGE_PARTS} images are accepted", param="images")
    return EditUpload(
        fields=fields,
        images=tuple(_reference_bytes(item, "images", max_image_bytes) for item in images),
        mask=None if mask is None else _reference_bytes(mask, "mask", max_image_bytes),
    )


def _reference_bytes(reference: object, param: str, max_bytes: int) -> bytes:
    """`{"image_url": "data:..."}` to bytes; file ids need an upload store we do not have."""
    if isinstance(reference, dict) and isinstance(reference.get("image_url"), str):
        return _url_bytes(reference["image_url"], param, max_bytes)
    if isinstance(reference, dict) and "file_id" in reference:
        raise InvalidRequest(
            "file_id is not supported here; send the image as a data URL in image_url",
            param=param,
        )
    raise InvalidRequest(
        f'{param} must be given as {{"image_url": "data:image/png;base64,..."}}', param=param
    )


def _url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    match = _DATA_URL.match(url.strip())
    if match is None:
        raise InvalidRequest(
            f"{param} must be a base64 data URL (data:image/png;base64,...): this server "
            "does not fetch remote images",
            param=param,
            code="invalid_image_url",
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match[1]), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"{param} is not valid base64", param=param, code="invalid_base64"
        ) from None
    return _within(data, param, max_bytes)


def _within(data: bytes, param: str, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise _file_too_large(param, max_bytes)
    return data


def _file_too_large(param: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{param} is larger than {max_bytes} bytes, the most this server accepts per file",
        param=param,
        code="image_file_too_large",
    )
