"""`GET /openapi.json`: an OpenAPI 3.1 document built from the pydantic request models.

Every route registers an `Operation`; one that takes a body names its model, and the
schemas come from `model_json_schema`, so the document cannot drift from what the server
validates. Each operation says its success status and media types as the route answers
them; `/v1/` routes (but the open result files) need the bearer key when keys are set, and
answer errors in the OpenAI shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

REF = "#/components/schemas/{model}"
JSON = ("application/json",)
PATH_PARAMETER = re.compile(r"{(\w+)}")
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


@dataclass(frozen=True)
class Operation:
    """One documented route; `body` is its request model and `media_type` how it arrives;
    `status` and `answers` (media types) are its success; `streams` adds SSE to them;
    `unavailable` documents a 503 with the same body (`/health`); a `public` route under
    `/v1/` needs no key."""

    method: str
    path: str
    summary: str
    body: type[BaseModel] | None = None
    media_type: str = "application/json"
    streams: bool = False
    files: Sequence[str] = ()
    status: int = 200
    answers: Sequence[str] = JSON
    unavailable: bool = False
    public: bool = False


def openapi_document(
    operations: Sequence[Operation], *, title: str, version: str
) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        spec: dict[str, Any] = {
            "summary": operation.summary,
            "operationId": _operation_id(operation),
            "responses": _responses(operation),
        }
        names = PATH_PARAMETER.findall(operation.path)
        if names:
            spec["parameters"] = [_path_parameter(name) for name in names]
        if _keyed(operation):
            spec["security"] = [{"bearer": []}]
        if operation.body is not None:
            schema = operation.body.model_json_schema(ref_template=REF)
            schemas.update(schema.pop("$defs", {}))
            schemas[operation.body.__name__] = schema
            ref: dict[str, Any] = {"$ref": REF.format(model=operation.body.__name__)}
            if operation.files:
                ref = {"allOf": [ref, _file_parts(operation.files)]}
            spec["requestBody"] = {
                "required": True,
                "content": {operation.media_type: {"schema": ref}},
            }
        paths.setdefault(operation.path, {})[operation.method.lower()] = spec
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _file_parts(names: Sequence[str]) -> dict[str, Any]:
    """Multipart file parts, which the pydantic models (fields only) do not describe."""
    binary = {"type": "string", "format": "binary"}
    properties = {
        name: {"type": "array", "items": binary} if name.endswith("[]") else binary
        for name in names
    }
    return {"type": "object", "properties": properties}


def _operation_id(operation: Operation) -> str:
    words = operation.path.strip("/").replace("{", "").replace("}", "").replace("/", "_")
    return f"{operation.method.lower()}_{words or 'root'}"


def _keyed(operation: Operation) -> bool:
    return operation.path.startswith("/v1/") and not operation.public


def _path_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _responses(operation: Operation) -> dict[str, Any]:
    kinds = [*operation.answers, *(["text/event-stream"] if operation.streams else [])]
    ok = {kind: {"schema": _body_schema(kind)} for kind in kinds}
    responses: dict[str, Any] = {str(operation.status): {"description": "success", "content": ok}}
    if operation.unavailable:
        responses["503"] = {"description": "not ready, or shutting down", "content": ok}
    if operation.path.startswith("/v1/"):
        responses["default"] = {
            "description": "an OpenAI-shaped error",
            "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
        }
    return responses


def _body_schema(media_type: str) -> dict[str, Any]:
    if media_type == "application/json":
        return {"type": "object"}
    if media_type.startswith("image/"):
        return {"type": "string", "format": "binary"}
    return {"type": "string"}
