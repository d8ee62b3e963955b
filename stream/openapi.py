"""`GET /openapi.json`: an OpenAPI 3.1 document built from the pydantic request models.

Each route that takes a body registers an `Operation` naming its model; the schemas come
from `model_json_schema`, so the document cannot drift from what the server validates.
Routes without a body are listed with their responses only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

REF = "#/components/schemas/{model}"
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
    """One documented route; `body` is its request model and `media_type` how it arrives."""

    method: str
    path: str
    summary: str
    body: type[BaseModel] | None = None
    media_type: str = "application/json"
    streams: bool = False
    files: Sequence[str] = ()


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


def _responses(operation: Operation) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if operation.streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    error = {
        "description": "an OpenAI-shaped error",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
    }
    return {"200": {"description": "success", "content": ok}, "default": error}
