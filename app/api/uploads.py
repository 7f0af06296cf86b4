"""Read a task request's body: its images and text fields, as multipart/form-data (one `image` part per
image, and optionally one `caption` field per image in the same order), as JSON (`image`, or `images`: a
list of base64 strings or {"image", "caption"} objects), or as a raw DICOM file (application/dicom, one
image) with the fields in the query string, as a PACS sends it. More than MEDMO_MAX_IMAGES images are
refused (413) before any is decoded; the images of a request share the body's size limit.

The body is read in chunks and refused with 413 as soon as it passes its limit (and before reading at all
when Content-Length already says so), and with 408 when it arrives too slowly: after a short grace, on
average slower than a minimum rate, or not whole within the upload timeout. Uploads in progress are
bounded in number of their own, apart from the queue for the model: a client that stalls mid-body holds
an upload slot, never a place in the queue. Multipart uploads are parsed in memory: patient images
written to temporary files could outlive a crash.

JSON and multipart are equally strict: a field given twice is refused, and JSON values must have the
field's own type (`"frame": true` is not frame 1).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Gauge
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from app.api.errors import ApiError, describe_validation_errors
from app.metrics import Metrics
from app.schemas import ImageFields

FieldsT = TypeVar("FieldsT", bound=ImageFields)

# Room for the text fields and the multipart framing around the image.
FIELDS_ALLOWANCE_BYTES = 256 * 1024
IMAGE_FIELD = "image"
IMAGES_FIELD = "images"  # JSON: several images, each a base64 string or {"image": ..., "caption": ...}
CAPTION_FIELD = "caption"  # multipart: one per image, in order; application/dicom: the query's one
MAX_CAPTION_CHARS = 200
# The query parameter choosing which image a picture answer draws (?image=1); not a field of the task.
PICTURE_PARAMETER = "image"
DICOM_MEDIA_TYPE = "application/dicom"
# The first seconds of an upload are not held to the minimum rate: connections start slowly.
RATE_GRACE_S = 5.0


@dataclass(frozen=True)
class UploadLimits:
    max_image_bytes: int  # the images of a request together
    timeout_s: float  # the whole body
    min_bytes_per_s: int  # on average, once the grace has passed
    max_images: int = 1


class Slots:
    """A bound on work of one kind in progress (uploads, previews), refused with 429 past it."""

    def __init__(self, limit: int, metrics: Metrics, *, what: str, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.in_progress = 0
        self.what = what
        self._metrics = metrics
        self._gauge = gauge

    @contextmanager
    def take(self) -> Iterator[None]:
        if self.in_progress >= self.limit:
            self._metrics.rejections.labels(reason=f"{self.what}_full").inc()
            raise ApiError(
                429,
                "overloaded",
                f"too many {self.what} are in progress; retry later",
                headers={"Retry-After": "1"},
            )
        self.in_progress += 1
        self._count()
        try:
            yield
        finally:
            self.in_progress -= 1
            self._count()

    def _count(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.in_progress)


@dataclass(frozen=True)
class UploadedImage:
    data: bytes
    caption: str | None = None


@dataclass(frozen=True)
class TaskUpload(Generic[FieldsT]):
    fields: FieldsT
    images: list[UploadedImage]  # as the client sent them, at least one


def body_limit(max_image_bytes: int) -> int:
    """The largest body that can carry an image of the maximum size: base64 in JSON is 4/3 of it."""
    return max_image_bytes * 4 // 3 + 4 + FIELDS_ALLOWANCE_BYTES


async def read_task_upload(
    request: Request, fields_model: type[FieldsT], limits: UploadLimits
) -> TaskUpload[FieldsT]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = body_limit(limits.max_image_bytes)
    _check_declared_length(request, limit)
    if media_type == "multipart/form-data":
        return await _read_multipart(request, fields_model, _Body(request, limit, limits))
    if media_type == "application/json" or media_type.endswith("+json"):
        return await _read_json(request, fields_model, limits)
    if media_type == DICOM_MEDIA_TYPE:
        return await _read_dicom(request, fields_model, _Body(request, limits.max_image_bytes, limits))
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


@dataclass(frozen=True)
class _Body:
    request: Request
    max_bytes: int
    limits: UploadLimits

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body's chunks, refused past `max_bytes` (413) or when they come too slowly (408)."""
        began = time.monotonic()
        received = 0
        stream = self.request.stream().__aiter__()
        while True:
            # The next chunk is due before the average rate would fall under the minimum, and before the
            # upload timeout: a stalled client is cut off, however little it has sent.
            due = min(
                began + RATE_GRACE_S + received / self.limits.min_bytes_per_s,
                began + self.limits.timeout_s,
            )
            try:
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise self._too_slow(began) from None
            except ClientDisconnect:
                raise ApiError(
                    400, "client_disconnected", "the client closed the connection mid-upload"
                ) from None
            received += len(chunk)
            if received > self.max_bytes:
                raise ApiError(
                    413,
                    "payload_too_large",
                    f"the request body is larger than the limit of {self.max_bytes} bytes",
                )
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def _too_slow(self, began: float) -> ApiError:
        if time.monotonic() - began >= self.limits.timeout_s:
            return ApiError(
                408, "upload_timeout", f"the body did not arrive within {self.limits.timeout_s:g} s"
            )
        return ApiError(
            408,
            "upload_too_slow",
            f"the body arrived more slowly than {self.limits.min_bytes_per_s} bytes/s",
        )


class _InMemoryMultiPartParser(MultiPartParser):
    # Starlette spools file parts above 1 MB to a temporary file; keep the whole upload in memory instead.
    spool_max_size = 2**62


async def _read_multipart(request: Request, fields_model: type[FieldsT], body: _Body) -> TaskUpload[FieldsT]:
    _reject_query_fields(request)
    limit = body.limits.max_images
    # One file part past the limit is parsed, so that too many images are told apart from a malformed body.
    parser = _InMemoryMultiPartParser(
        request.headers, body.chunks(), max_files=limit + 1, max_fields=16 + limit, max_part_size=64 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):  # Starlette's words for a part past max_files
            raise too_many_images(limit) from None
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc.message}") from None
    try:
        images: list[bytes] = []
        captions: list[str] = []
        text_fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if name == IMAGE_FIELD:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", "image: must be a file part, not a text field")
                images.append(await value.read())
            elif isinstance(value, UploadFile):
                raise ApiError(422, "invalid_request", f"{name}: only 'image' may be a file")
            elif name == CAPTION_FIELD:
                captions.append(value)
            elif name in text_fields:
                raise ApiError(422, "invalid_request", f"{name}: given more than once")
            else:
                text_fields[name] = value
    finally:
        await form.close()
    fields = _validate_fields(fields_model, text_fields)
    if not images:
        raise ApiError(422, "invalid_request", "image: Field required")
    if len(images) > limit:
        raise too_many_images(limit)
    if captions and len(captions) != len(images):
        raise ApiError(
            422,
            "invalid_request",
            f"caption: one per image, in the images' order ({len(captions)} captions for {len(images)} "
            "images; an empty caption for an image without one)",
        )
    return TaskUpload(
        fields=fields,
        images=[
            UploadedImage(data, _caption(caption))
            for data, caption in zip(images, captions or [""] * len(images), strict=True)
        ],
    )


def too_many_images(limit: int) -> ApiError:
    return ApiError(
        413, "too_many_images", f"at most {limit} images per request on this server (MEDMO_MAX_IMAGES)"
    )


def _caption(value: object, where: str = "caption") -> str | None:
    """A caption as given, stripped; empty means none."""
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"{where}: must be a string")
    caption = " ".join(value.split())
    if len(caption) > MAX_CAPTION_CHARS:
        raise ApiError(422, "invalid_request", f"{where}: at most {MAX_CAPTION_CHARS} characters")
    return caption or None


async def read_json_object(request: Request, limits: UploadLimits) -> dict[str, Any]:
    """A JSON object body, read within the limits; a key given twice is refused, not silently dropped."""
    text = await _Body(request, body_limit(limits.max_image_bytes), limits).read()
    if not text.strip():
        raise ApiError(400, "bad_request", "the request body is empty")
    try:
        document = json.loads(text, object_pairs_hook=_refuse_repeated_keys)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", "the request body is not valid JSON") from None
    except _RepeatedKeyError as exc:
        raise ApiError(422, "invalid_request", f"{exc.key[:64]}: given more than once") from None
    if not isinstance(document, dict):
        raise ApiError(422, "invalid_request", "the request body must be a JSON object")
    return document


async def _read_json(
    request: Request, fields_model: type[FieldsT], limits: UploadLimits
) -> TaskUpload[FieldsT]:
    _reject_query_fields(request)
    document = await read_json_object(request, limits)
    single = document.pop(IMAGE_FIELD, None)
    several = document.pop(IMAGES_FIELD, None)
    # JSON carries typed values: they must be of the field's type, not merely convertible to it.
    fields = _validate_fields(fields_model, document, strict=True)
    if single is not None and several is not None:
        raise ApiError(
            422, "invalid_request", "image, images: give one image in 'image' or several in 'images'"
        )
    if single is not None:
        if not isinstance(single, str):
            raise ApiError(422, "invalid_request", "image: must be a base64 string or a data URI")
        return TaskUpload(fields=fields, images=[UploadedImage(decode_base64_image(single))])
    if several is None:
        raise ApiError(422, "invalid_request", "image: Field required (or 'images', a list)")
    if not isinstance(several, list) or not several:
        raise ApiError(422, "invalid_request", "images: must be a non-empty list")
    if len(several) > limits.max_images:
        raise too_many_images(limits.max_images)
    return TaskUpload(fields=fields, images=[_json_image(item, index) for index, item in enumerate(several)])


def _json_image(item: object, index: int) -> UploadedImage:
    """One entry of `images`: a base64 string, or {"image": base64, "caption": text}."""
    where = f"images.{index}"
    if isinstance(item, str):
        return UploadedImage(decode_base64_image(item, where))
    if not isinstance(item, dict):
        raise ApiError(422, "invalid_request", f"{where}: must be a base64 string or an object with 'image'")
    unknown = sorted(set(item) - {IMAGE_FIELD, CAPTION_FIELD})
    if unknown:
        raise ApiError(422, "invalid_request", f"{where}.{unknown[0][:64]}: Extra inputs are not permitted")
    encoded = item.get(IMAGE_FIELD)
    if not isinstance(encoded, str):
        raise ApiError(422, "invalid_request", f"{where}.image: must be a base64 string or a data URI")
    caption = item.get(CAPTION_FIELD)
    return UploadedImage(
        decode_base64_image(encoded, f"{where}.image"),
        None if caption is None else _caption(caption, f"{where}.caption"),
    )


async def _read_dicom(request: Request, fields_model: type[FieldsT], body: _Body) -> TaskUpload[FieldsT]:
    fields: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name == PICTURE_PARAMETER:
            continue  # which image a picture answer draws (tasks.py)
        if name in fields:
            raise ApiError(422, "invalid_request", f"{name}: given more than once")
        fields[name] = value
    caption = fields.pop(CAPTION_FIELD, None)
    validated = _validate_fields(fields_model, fields)
    return TaskUpload(
        fields=validated,
        images=[UploadedImage(await body.read(), None if caption is None else _caption(caption))],
    )


def _reject_query_fields(request: Request) -> None:
    if any(name != PICTURE_PARAMETER for name in request.query_params):
        raise ApiError(
            422, "invalid_request", "query parameters carry the fields only with an application/dicom body"
        )


class _RepeatedKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise _RepeatedKeyError(key)
        document[key] = value
    return document


def _validate_fields(
    fields_model: type[FieldsT], values: Mapping[str, object], *, strict: bool = False
) -> FieldsT:
    try:
        return fields_model.model_validate(values, strict=strict)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation_errors(exc.errors())) from None


def decode_base64_image(value: str, where: str = "image") -> bytes:
    """Plain base64 (standard or URL-safe, padding optional, line breaks allowed) or a base64 data URI."""
    payload = value
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(422, "invalid_request", f"{where}: a data URI must be base64-encoded")
    payload = "".join(payload.split())
    if not payload:
        raise ApiError(400, "unreadable_image", "the image is empty")
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", f"{where}: not valid base64") from None
