"""OpenAPI for the task routes: each takes multipart/form-data, JSON or a raw DICOM file.

The routes read their bodies themselves (one reader for every encoding, with size limits enforced while
reading), so FastAPI cannot derive the request schemas; they are built here from the same field models
that validate the requests, and registered as components so generated clients get named types. A raw
DICOM body carries the fields as query parameters; a client asking for application/dicom gets a
Structured Report back.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas import ErrorResponse, TaskFields

_IMAGE_UPLOAD = {
    "type": "string",
    "format": "binary",
    "description": "The image file: PNG, JPEG, TIFF, BMP, WebP or DICOM.",
}
_BINARY = {"type": "string", "format": "binary"}
# A 32x32 grayscale PNG: the smallest image the model accepts, so examples are real requests.
EXAMPLE_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAAAAABWESUoAAAAGElEQVR42mNsYMAPmBhGFYwqGFUwQhUAAJe+AMD8WknZAAAAAElFTkSuQmCC"
_IMAGE_BASE64 = {
    "type": "string",
    "contentEncoding": "base64",
    "description": "The image file, base64-encoded, plain or as a data URI (data:image/png;base64,...).",
    "examples": [EXAMPLE_PNG_BASE64],
}

TASK_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Unreadable image or malformed body."},
    401: {"model": ErrorResponse, "description": "A valid API key is required."},
    408: {"model": ErrorResponse, "description": "The body did not arrive within the upload timeout."},
    413: {"model": ErrorResponse, "description": "Body, image file or decoded image larger than allowed."},
    406: {
        "model": ErrorResponse,
        "description": "Accept names neither JSON nor DICOM, or DICOM for a non-DICOM image.",
    },
    415: {"model": ErrorResponse, "description": "Unsupported media type or image format."},
    422: {
        "model": ErrorResponse,
        "description": "Missing or invalid field, or an image the model cannot use.",
    },
    429: {
        "model": ErrorResponse,
        "description": "Queue full; retry after the number of seconds in Retry-After.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}},
    },
    500: {"model": ErrorResponse, "description": "Generation failed for this request."},
    503: {
        "model": ErrorResponse,
        "description": "Not ready, shutting down, or the inference worker stopped.",
    },
    504: {"model": ErrorResponse, "description": "The request's deadline passed first."},
}


def _schema_names(fields_model: type[TaskFields]) -> tuple[str, str]:
    stem = fields_model.__name__.removesuffix("Fields")
    return f"{stem}Upload", f"{stem}Json"


def task_request_body(fields_model: type[TaskFields]) -> dict[str, Any]:
    """`openapi_extra` for a task route: the same fields as a multipart upload, as JSON, or as query
    parameters beside a raw DICOM body; and a Structured Report as the alternative response."""
    upload, as_json = _schema_names(fields_model)
    fields = fields_model.model_json_schema(ref_template="#/components/schemas/{model}")
    query = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {key: value for key, value in schema.items() if key not in ("title", "examples")},
            "description": "With an application/dicom body only"
            + (" (required then)" if name in fields.get("required", []) else "")
            + ": "
            + schema.get("description", name),
        }
        for name, schema in fields.get("properties", {}).items()
    ]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{upload}"}},
                "application/json": {"schema": {"$ref": f"#/components/schemas/{as_json}"}},
                "application/dicom": {"schema": _BINARY},
            },
        },
        "parameters": query,
        "responses": {
            "200": {
                "content": {"application/dicom": {"schema": _BINARY}},
                "description": "JSON, or with Accept: application/dicom and a DICOM upload, a DICOM "
                "Comprehensive Structured Report in the source's study.",
            }
        },
    }


def task_body_schemas(fields_model: type[TaskFields]) -> dict[str, dict[str, Any]]:
    fields = fields_model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas: dict[str, dict[str, Any]] = {}
    for name, image in zip(_schema_names(fields_model), (_IMAGE_UPLOAD, _IMAGE_BASE64), strict=True):
        schema = copy.deepcopy(fields)
        schema.pop("$defs", None)
        schema["title"] = name
        schema["properties"] = {"image": image, **schema.get("properties", {})}
        schema["required"] = ["image", *schema.get("required", [])]
        schemas[name] = schema
    return schemas


class MedmoAPI(FastAPI):
    """FastAPI with the task request bodies added to the generated schema."""

    def __init__(self, *, task_fields: tuple[type[TaskFields], ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task_fields = task_fields

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        schema = get_openapi(
            title=self.title,
            version=self.version,
            openapi_version=self.openapi_version,
            description=self.description,
            routes=self.routes,
            tags=self.openapi_tags,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for fields_model in self.task_fields:
            components.update(task_body_schemas(fields_model))
            nested = fields_model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(nested.get("$defs", {}))
        self.openapi_schema = schema
        return schema
