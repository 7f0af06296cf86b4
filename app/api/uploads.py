"""Read a task request's body: the image and the text fields, as multipart/form-data, as JSON, or as a
raw DICOM file (application/dicom) with the fields in the query string, as a PACS sends it.

The body is read in chunks and refused with 413 as soon as it passes its limit (and before reading at all
when Content-Length already says so). Multipart uploads are parsed in memory: patient images written to
temporary files could outlive a crash.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from app.api.errors import ApiError, describe_validation_errors
from app.schemas import TaskFields

FieldsT = TypeVar("FieldsT", bound=TaskFields)

# Room for the text fields and the multipart framing around the image.
FIELDS_ALLOWANCE_BYTES = 256 * 1024
IMAGE_FIELD = "image"
DICOM_MEDIA_TYPE = "application/dicom"


@dataclass(frozen=True)
class TaskUpload(Generic[FieldsT]):
    fields: FieldsT
    image: bytes


def body_limit(max_image_bytes: int) -> int:
    """The largest body that can carry an image of the maximum size: base64 in JSON is 4/3 of it."""
    return max_image_bytes * 4 // 3 + 4 + FIELDS_ALLOWANCE_BYTES


async def read_task_upload(
    request: Request, fields_model: type[FieldsT], *, max_image_bytes: int
) -> TaskUpload[FieldsT]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = body_limit(max_image_bytes)
    _check_declared_length(request, limit)
    if media_type == "multipart/form-data":
        return await _read_multipart(request, fields_model, limit)
    if media_type == "application/json" or media_type.endswith("+json"):
        return await _read_json(request, fields_model, limit)
    if media_type == DICOM_MEDIA_TYPE:
        return await _read_dicom(request, fields_model, max_image_bytes)
    raise ApiError(
        415,
        "unsupported_media_type",
        "send multipart/form-data with the image file in field 'image', application/json with the image "
        "base64-encoded in 'image', or a DICOM file as application/dicom with the fields in the query string",
    )


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise ApiError(400, "bad_request", "the Content-Length header is not a number")
    if int(declared) > limit:
        raise ApiError(
            413, "payload_too_large", f"the request body is larger than the limit of {limit} bytes"
        )


async def _bounded(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(
                    413, "payload_too_large", f"the request body is larger than the limit of {limit} bytes"
                )
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection mid-upload") from None


class _InMemoryMultiPartParser(MultiPartParser):
    # Starlette spools file parts above 1 MB to a temporary file; keep the whole upload in memory instead.
    spool_max_size = 2**62


async def _read_multipart(request: Request, fields_model: type[FieldsT], limit: int) -> TaskUpload[FieldsT]:
    _reject_query_fields(request)
    parser = _InMemoryMultiPartParser(
        request.headers, _bounded(request, limit), max_files=1, max_fields=16, max_part_size=64 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc.message}") from None
    try:
        image: bytes | None = None
        text_fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if name == IMAGE_FIELD:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", "image: must be a file part, not a text field")
                image = await value.read()
            elif isinstance(value, UploadFile):
                raise ApiError(422, "invalid_request", f"{name}: only 'image' may be a file")
            elif name in text_fields:
                raise ApiError(422, "invalid_request", f"{name}: given more than once")
            else:
                text_fields[name] = value
    finally:
        await form.close()
    fields = _validate_fields(fields_model, text_fields)
    if image is None:
        raise ApiError(422, "invalid_request", "image: Field required")
    return TaskUpload(fields=fields, image=image)


async def _read_json(request: Request, fields_model: type[FieldsT], limit: int) -> TaskUpload[FieldsT]:
    _reject_query_fields(request)
    body = b"".join([chunk async for chunk in _bounded(request, limit)])
    if not body.strip():
        raise ApiError(400, "bad_request", "the request body is empty")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", "the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ApiError(422, "invalid_request", "the request body must be a JSON object")
    encoded = document.pop(IMAGE_FIELD, None)
    fields = _validate_fields(fields_model, document)
    if encoded is None:
        raise ApiError(422, "invalid_request", "image: Field required")
    if not isinstance(encoded, str):
        raise ApiError(422, "invalid_request", "image: must be a base64 string or a data URI")
    return TaskUpload(fields=fields, image=decode_base64_image(encoded))


async def _read_dicom(
    request: Request, fields_model: type[FieldsT], max_image_bytes: int
) -> TaskUpload[FieldsT]:
    fields: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in fields:
            raise ApiError(422, "invalid_request", f"{name}: given more than once")
        fields[name] = value
    validated = _validate_fields(fields_model, fields)
    body = b"".join([chunk async for chunk in _bounded(request, max_image_bytes)])
    return TaskUpload(fields=validated, image=body)


def _reject_query_fields(request: Request) -> None:
    if request.query_params:
        raise ApiError(
            422, "invalid_request", "query parameters carry the fields only with an application/dicom body"
        )


def _validate_fields(fields_model: type[FieldsT], values: Mapping[str, object]) -> FieldsT:
    try:
        return fields_model.model_validate(values)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation_errors(exc.errors())) from None


def decode_base64_image(value: str) -> bytes:
    """Plain base64 (standard or URL-safe, padding optional, line breaks allowed) or a base64 data URI."""
    payload = value
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(422, "invalid_request", "image: a data URI must be base64-encoded")
    payload = "".join(payload.split())
    if not payload:
        raise ApiError(400, "unreadable_image", "the image is empty")
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", "image: not valid base64") from None
