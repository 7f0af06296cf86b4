"""OpenAPI for the task routes: each takes multipart/form-data, JSON or a raw DICOM file.

The routes read their bodies themselves (one reader for every encoding, with size limits enforced while
reading), so FastAPI cannot derive the request schemas; they are built here from the same field models
that validate the requests, and registered as components so generated clients get named types. A raw
DICOM body carries the fields as query parameters; a client asking for application/dicom gets a
TID 1500 Measurement Report back, and one asking for application/fhir+json a FHIR R4 Bundle.

Written for generated clients in more than one ecosystem: files are marked as raw bytes both the OpenAPI
3.1 way (`contentMediaType`, what TypeScript generators key on) and the 3.0 way (`format: binary`, what
openapi-python-client reads); a 200 lists its JSON body first and its DICOM alternative under its own
media type, so a client that asks for JSON gets the JSON type; every operation declares its security
and every tag is described.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.api.negotiation import DICOM, EVENTS, JPEG, PNG
from app.outputs.fhir import FHIR_JSON
from app.schemas import ErrorResponse, ImageFields, TaskFields

_IMAGE_UPLOAD = {
    "type": "string",
    "format": "binary",
    # Any of several formats, recognised from the bytes: so the generic binary type, as FastAPI writes
    # for its own file uploads.
    "contentMediaType": "application/octet-stream",
    "description": "The image file: PNG, JPEG, TIFF, BMP, WebP or DICOM.",
}
_IMAGE_UPLOADS = {
    "type": "array",
    "items": {key: value for key, value in _IMAGE_UPLOAD.items() if key != "description"},
    "minItems": 1,
    "description": "The image file, or one part named image per image (at most MEDMO_MAX_IMAGES, see /info: a "
    "study's views, slices, a prior): PNG, JPEG, TIFF, BMP, WebP or DICOM.",
}
_CAPTIONS = {
    "type": "array",
    "items": {"type": "string", "maxLength": 200},
    "description": "What each image is (frontal, lateral, prior 2025-03-02, slice 41 of 80), put before it in "
    "the prompt: none, or one per image in the images' order (empty for an image without one).",
    "examples": [["frontal", "lateral"]],
}
_DICOM_FILE = {"type": "string", "format": "binary", "contentMediaType": DICOM}
_PICTURE = {"type": "string", "format": "binary", "contentMediaType": "image/*"}
_FHIR_BUNDLE = {
    "type": "object",
    "description": "A FHIR R4 Bundle of type collection (http://hl7.org/fhir/R4/bundle.html): a preliminary "
    "DiagnosticReport, an Observation per region and score, ImagingStudy, Device, Provenance, and a Patient "
    "only from what the DICOM header (or the subject fields) holds.",
    "properties": {
        "resourceType": {"type": "string", "const": "Bundle"},
        "type": {"type": "string", "const": "collection"},
        "entry": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["resourceType", "type"],
}
_EVENT_STREAM = {
    "type": "string",
    "description": "Server-Sent Events: event delta, data {text}; then event result, data the JSON result; or "
    "event error, data the error shape.",
    "examples": ['event: delta\ndata: {"text":"The lungs"}\n\nevent: result\ndata: {"request_id":"..."}\n\n'],
}
# A 32x32 grayscale PNG: the smallest image the model accepts, so examples are real requests.
EXAMPLE_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAAAAABWESUoAAAAGElEQVR42mNsYMAPmBhGFYwqGFUwQhUAAJe+AMD8WknZAAAAAElFTkSuQmCC"
_IMAGE_BASE64 = {
    "type": "string",
    "contentEncoding": "base64",
    "description": "The image file, base64-encoded, plain or as a data URI (data:image/png;base64,...).",
    "examples": [EXAMPLE_PNG_BASE64],
}
_IMAGES_JSON = {
    "type": "array",
    "minItems": 1,
    "items": {
        "anyOf": [
            {key: value for key, value in _IMAGE_BASE64.items() if key != "examples"},
            {
                "type": "object",
                "properties": {
                    "image": {key: value for key, value in _IMAGE_BASE64.items() if key != "examples"},
                    "caption": {
                        "type": "string",
                        "maxLength": 200,
                        "description": "What the image is, put before it in the prompt.",
                    },
                },
                "required": ["image"],
                "additionalProperties": False,
            },
        ]
    },
    "description": "Instead of image: several images (at most MEDMO_MAX_IMAGES, see /info), each base64 or "
    "{image, caption}.",
    "examples": [[{"image": EXAMPLE_PNG_BASE64, "caption": "frontal"}]],
}

TASK_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Unreadable image or malformed body."},
    401: {"model": ErrorResponse, "description": "A valid API key is required."},
    403: {
        "model": ErrorResponse,
        "description": "Sent from a page on another origin than the service's own or MEDMO_CORS_ORIGINS.",
    },
    408: {"model": ErrorResponse, "description": "The body did not arrive within the upload timeout."},
    413: {"model": ErrorResponse, "description": "Body, image file or decoded image larger than allowed."},
    406: {
        "model": ErrorResponse,
        "description": "Accept names no representation this route gives (a picture from a route that draws "
        "nothing, a DICOM object that is not measurement-report, basic-report or gsps, say), or DICOM for a "
        "non-DICOM image.",
    },
    415: {
        "model": ErrorResponse,
        "description": "Content-Type not one of the request body's documented media types, or an image "
        "format not supported.",
    },
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


def _schema_names(fields_model: type[ImageFields]) -> tuple[str, str]:
    stem = fields_model.__name__.removesuffix("Fields")
    return f"{stem}Upload", f"{stem}Json"


def upload_request_body(fields_model: type[ImageFields]) -> dict[str, Any]:
    """`openapi_extra` for a route that takes an image: the same fields as a multipart upload, as JSON, or
    as query parameters beside a raw DICOM body."""
    upload, as_json = _schema_names(fields_model)
    fields = fields_model.model_json_schema(ref_template="#/components/schemas/{model}")
    if issubclass(fields_model, TaskFields):
        fields["properties"]["caption"] = {
            "type": "string",
            "maxLength": 200,
            "description": "What the image is, put before it in the prompt.",
        }
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
                DICOM: {"schema": _DICOM_FILE},
            },
        },
        "parameters": query,
    }


def task_request_body(fields_model: type[ImageFields], *, draws: bool) -> dict[str, Any]:
    """`openapi_extra` for a task route: its upload, and the alternatives to its JSON answer."""
    # FastAPI writes the JSON body of the 200 from the route's response model; this adds the alternatives
    # after it. Each under its own media type: a client types the JSON path by asking for
    # application/json (openapi-fetch: createClient<paths, "application/json">).
    content: dict[str, Any] = {
        DICOM: {"schema": _DICOM_FILE},
        FHIR_JSON: {"schema": _FHIR_BUNDLE},
        EVENTS: {"schema": _EVENT_STREAM},
    }
    description = (
        "The task's JSON result. With Accept: application/dicom and DICOM images, a DICOM Measurement Report "
        "(TID 1500, Comprehensive 3D SR) in the first source's study instead; with Accept: application/dicom; "
        "object=basic-report, a Basic Diagnostic Imaging Report (TID 2000, Comprehensive SR). With Accept: "
        "application/fhir+json, a FHIR R4 Bundle (collection); for images without a DICOM header its Patient "
        "and study come from patient_id, patient_id_issuer, accession_number and study_instance_uid, never "
        "invented. With Accept: text/event-stream (or stream=true), "
        'Server-Sent Events as the model writes: `delta` events (data: {"text": "..."}), then one `result` '
        "event whose data is the JSON result, or one `error` event whose data is the error shape."
    )
    if draws:
        content.update({PNG: {"schema": _PICTURE}, JPEG: {"schema": _PICTURE}})
        description += (
            " With Accept: image/png or image/jpeg, the image as displayed with the findings drawn. With "
            "Accept: application/dicom; object=gsps and a DICOM image, a Grayscale Softcopy Presentation "
            "State holding the boxes, for PACS viewers."
        )
    return {
        **upload_request_body(fields_model),
        "responses": {"200": {"content": content, "description": description}},
    }


def task_body_schemas(fields_model: type[ImageFields]) -> dict[str, dict[str, Any]]:
    """The multipart and JSON bodies of a route taking `fields_model`: one image, or for a task, several."""
    fields = fields_model.model_json_schema(ref_template="#/components/schemas/{model}")
    several = issubclass(fields_model, TaskFields)
    upload_images: dict[str, Any] = (
        {"image": _IMAGE_UPLOADS, "caption": _CAPTIONS} if several else {"image": _IMAGE_UPLOAD}
    )
    json_images: dict[str, Any] = (
        {"image": _IMAGE_BASE64, "images": _IMAGES_JSON} if several else {"image": _IMAGE_BASE64}
    )
    schemas: dict[str, dict[str, Any]] = {}
    for name, images in zip(_schema_names(fields_model), (upload_images, json_images), strict=True):
        schema = copy.deepcopy(fields)
        schema.pop("$defs", None)
        schema["title"] = name
        schema["properties"] = {**copy.deepcopy(images), **schema.get("properties", {})}
        # JSON takes `image` or `images`: the schema requires neither, the server exactly one of them.
        if not (several and name.endswith("Json")):
            schema["required"] = ["image", *schema.get("required", [])]
        for field in schema["properties"].values():
            # A field left out and a null mean the same to the server; a declared default makes
            # openapi-typescript, which reads one as "always present", require the field of callers.
            if "default" in field and field["default"] is None:
                del field["default"]
        schemas[name] = schema
    return schemas


# Relative to where the schema is served, so clients call the host they fetched it from, whatever name a
# hospital's network gives the service. FastAPI puts a proxy's root path before it.
SERVERS = [{"url": "/", "description": "The service that serves this schema"}]
TAGS = [
    {
        "name": "tasks",
        "description": "Inference on an image or a study's images (views, slices, a prior): a clinical "
        "question answered, a radiology report, abnormalities or a named target boxed. Images come as "
        "multipart files, base64 in JSON, or a raw DICOM body; the answer is JSON, a DICOM Measurement Report "
        "(TID 1500) for DICOM images when Accept asks for application/dicom, or a FHIR R4 Bundle when it asks "
        "for application/fhir+json.",
    },
    {
        "name": "dicomweb",
        "description": "The same tasks on an image in the PACS, named by its Study, Series and SOP Instance "
        "UIDs: the service fetches it with WADO-RS from the PACS it is configured with (never from a URL a "
        "client sends), stores the answer back into the study with STOW-RS when asked, and sends it as a "
        "FHIR bundle to the FHIR server when one is configured (MEDMO_FHIR_URL).",
    },
    {
        "name": "viewer",
        "description": "What the viewer page at / uses, and integrators too: an upload as the service "
        "displays it, without running the model.",
    },
    {
        "name": "openai",
        "description": "OpenAI-compatible chat completions about images (data: URIs) or text alone, for the openai SDKs "
        "and the tools built on them. Errors here are in OpenAI's shape.",
    },
    {
        "name": "operations",
        "description": "Liveness and readiness probes (never a key), the model and limits in force, "
        "and Prometheus metrics.",
    },
]
LICENSE = {"name": "Apache-2.0", "identifier": "Apache-2.0"}


class MedmoAPI(FastAPI):
    """FastAPI with the task request bodies, servers, tags and licence in the generated schema."""

    def __init__(
        self,
        *,
        upload_fields: tuple[type[ImageFields], ...] = (),
        body_models: tuple[type[BaseModel], ...] = (),
        **kwargs: Any,
    ) -> None:
        """Request bodies that routes read themselves (within limits), named in the schema: the fields of
        image uploads (`upload_fields`, as multipart and JSON), and other JSON bodies (`body_models`)."""
        super().__init__(servers=SERVERS, openapi_tags=TAGS, license_info=LICENSE, **kwargs)
        self.upload_fields = upload_fields
        self.body_models = body_models

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        schema = get_openapi(
            title=self.title,
            version=self.version,
            openapi_version=self.openapi_version,
            description=self.description,
            license_info=self.license_info,
            routes=self.routes,
            tags=self.openapi_tags,
            servers=self.servers,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for fields_model in self.upload_fields:
            components.update(task_body_schemas(fields_model))
            nested = fields_model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(nested.get("$defs", {}))
        for model in self.body_models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        self.openapi_schema = schema
        return schema
