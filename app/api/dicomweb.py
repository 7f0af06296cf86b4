"""Tasks on an image in the PACS, named by its UIDs: the service fetches it (WADO-RS), runs the task, and
when asked stores the answer back into its study (STOW-RS).

One route per task, at the instance's own DICOMweb path with the task appended:
POST /dicomweb/studies/{study}/series/{series}/instances/{instance}/report, and so on. The body is the
task's JSON fields (as for POST /report, less `stream`) and `store`, what to file back. The request goes
through the same pipeline as the task routes, in the same order: admission before anything is fetched,
then the fetch (bounded in time and bytes, holding an upload slot as an upload would), decoding, the
queue, the model, and the store, all within the request's deadline. The PACS is the one configured
(MEDMO_DICOMWEB_URL); the UIDs in the path are checked to be DICOM UIDs before any URL is made of them.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from functools import partial
from typing import Annotated, Any, Literal

import pydicom
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from app.api.auth import require_api_key
from app.api.deps import get_running
from app.api.errors import ApiError, describe_validation_errors
from app.api.middleware import request_record
from app.api.openapi import TASK_ERROR_RESPONSES
from app.api.pipeline import ImageUpload, Submitted, collect, deadline, in_pool, submit, upload_limits
from app.api.tasks import (
    RequestId,
    RequestTimeout,
    anchorable_report,
    anchorable_state,
    dicom_answer,
    read_answer,
)
from app.api.uploads import read_json_object
from app.conversation import Captioned
from app.imaging import DecodedImage
from app.pacs.dicomweb import (
    UID_MAX_LENGTH,
    UID_PATTERN,
    Dicomweb,
    PacsError,
    PacsNotConfiguredError,
    PacsSettings,
)
from app.schemas import ErrorResponse, StoredInstance, TaskFields
from app.settings import Settings
from app.tasks import TASKS
from app.tasks.base import Task

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_api_key)])

# The task's fields and `store`: a few kilobytes at most.
MAX_BODY_BYTES = 64 * 1024
EXAMPLE_STUDY, EXAMPLE_SERIES = "1.2.840.113619.2.1", "1.2.840.113619.2.1.2"
EXAMPLE_INSTANCE = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
_EXAMPLE_SR_SERIES, _EXAMPLE_SR = "1.2.826.0.1.3680043.10.511.3.1", "1.2.826.0.1.3680043.10.511.3.2"
STORED_EXAMPLE = {
    "object": "sr",
    "study_instance_uid": EXAMPLE_STUDY,
    "series_instance_uid": _EXAMPLE_SR_SERIES,
    "sop_instance_uid": _EXAMPLE_SR,
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.33",
    "retrieve_url": f"http://orthanc:8042/dicom-web/studies/{EXAMPLE_STUDY}/series/{_EXAMPLE_SR_SERIES}"
    f"/instances/{_EXAMPLE_SR}",
}


def _uid(level: str, example: str) -> Any:
    return Path(
        pattern=UID_PATTERN,
        min_length=1,
        max_length=UID_MAX_LENGTH,
        description=f"{level} Instance UID of the image in the PACS.",
        examples=[example],
    )


StudyUid = Annotated[str, _uid("Study", EXAMPLE_STUDY)]
SeriesUid = Annotated[str, _uid("Series", EXAMPLE_SERIES)]
InstanceUid = Annotated[str, _uid("SOP", EXAMPLE_INSTANCE)]

STORE_DESCRIPTION = (
    "What to store back into the image's study in the PACS (STOW-RS): sr, the answer as a DICOM Structured "
    "Report{gsps}. Empty: nothing is stored."
)


def request_model(task: Task[Any, Any]) -> type[BaseModel]:
    """The JSON body of a task's DICOMweb route: its fields (less `stream`: the answer is one JSON), and
    `store`."""
    kinds = Literal["sr", "gsps"] if task.draws else Literal["sr"]
    gsps = "; gsps, the findings as a Grayscale Softcopy Presentation State" if task.draws else ""
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in task.fields.model_fields.items()
        if name not in ("stream", "image_order")  # one JSON answer; one instance
    }
    fields["store"] = (
        list[kinds],  # type: ignore[valid-type]
        Field(
            default_factory=list,
            max_length=2,
            description=STORE_DESCRIPTION.format(gsps=gsps),
            examples=[["sr", "gsps"] if task.draws else ["sr"]],
        ),
    )
    stem = task.fields.__name__.removesuffix("Fields")
    return create_model(
        f"Dicomweb{stem}Request",
        __config__=ConfigDict(
            extra="forbid", str_strip_whitespace=True, json_schema_extra=_without_null_defaults
        ),
        __doc__=f"/{task.name} on an image in the PACS: the task's fields, and what to store back.",
        **fields,
    )


def _without_null_defaults(schema: dict[str, Any]) -> None:
    # A field left out and a null mean the same to the server; a declared default makes openapi-typescript,
    # which reads one as "always present", require the field of callers (as for the task routes' bodies).
    for field in schema.get("properties", {}).values():
        if "default" in field and field["default"] is None:
            del field["default"]


def response_model(task: Task[Any, Any]) -> type[BaseModel]:
    """The task's JSON answer, and what was stored where."""
    stem = task.fields.__name__.removesuffix("Fields")
    return create_model(
        f"Dicomweb{stem}Response",
        __base__=task.response,
        stored=(
            list[StoredInstance],
            Field(
                description="The answers stored into the PACS, in the order asked; empty if none were asked for.",
                examples=[[STORED_EXAMPLE]],
            ),
        ),
    )


REQUEST_MODELS = {name: request_model(task) for name, task in TASKS.items()}
RESPONSE_MODELS = {name: response_model(task) for name, task in TASKS.items()}


def pacs_settings(settings: Settings) -> PacsSettings:
    if settings.dicomweb_url is None:
        raise PacsNotConfiguredError("no PACS is configured for DICOMweb (MEDMO_DICOMWEB_URL)")
    return PacsSettings(
        url=settings.dicomweb_url,
        credentials_file=settings.dicomweb_credentials_file,
        timeout_s=settings.dicomweb_timeout_s,
        retries=settings.dicomweb_retries,
        max_instance_bytes=settings.max_upload_bytes,
    )


def dicomweb_endpoint(task: Task[Any, Any]) -> Callable[..., Coroutine[Any, Any, Response]]:
    body_model, answer_model = REQUEST_MODELS[task.name], RESPONSE_MODELS[task.name]

    async def endpoint(
        request: Request,
        study_instance_uid: StudyUid,
        series_instance_uid: SeriesUid,
        sop_instance_uid: InstanceUid,
        x_request_timeout: RequestTimeout = None,
        x_request_id: RequestId = None,
    ) -> Response:
        arrived = time.monotonic()
        request_record(request).task = task.name
        running = get_running(request)
        settings = running.service.settings
        pacs = Dicomweb(pacs_settings(settings))
        running.engine.check_admission()
        async with deadline(request, x_request_timeout) as deadline_s:
            with running.service.uploads.take():
                body = await read_body(request, body_model, settings)
                store: list[Literal["sr", "gsps"]] = body.store  # type: ignore[attr-defined]
                fields: TaskFields = task.fields.model_validate(body.model_dump(exclude={"store"}))
                dicom = await pacs.retrieve_instance(
                    study_instance_uid, series_instance_uid, sop_instance_uid
                )
            convention = settings.box_convention
            submitted = await submit(
                request,
                arrived=arrived,
                options=running.service.options(task.name, fields.max_new_tokens),
                bounded=fields.max_new_tokens is None,
                uploads=[ImageUpload(dicom, frame=fields.frame, window=fields.window)],
                queries=lambda images, order: task.queries(
                    fields, [Captioned(image.picture) for image in images], order, convention
                ),
                deadline_s=deadline_s,
                deltas=False,
                check_images=the_instances_asked_for(
                    [(study_instance_uid, series_instance_uid, sop_instance_uid)], store
                ),
            )
            completed = await collect(request, submitted)
            submitted.finished(completed, task.name)
            parsed = read_answer(task, submitted, completed, convention)
            stored = await store_answers(pacs, store, task, fields, parsed, submitted, study_instance_uid)
        answer = task.answer(parsed, [c.generation.text for c in completed], convention)
        document = answer_model(**submitted.envelope(completed), **answer, stored=stored)
        return JSONResponse(document.model_dump(mode="json"))

    endpoint.__name__ = f"dicomweb_{task.name}"
    return endpoint


async def read_body(request: Request, body_model: type[BaseModel], settings: Settings) -> BaseModel:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "send the task's fields as application/json ({} for none)"
        )
    limits = replace(upload_limits(settings), max_image_bytes=MAX_BODY_BYTES)
    document = await read_json_object(request, limits)
    try:
        # JSON carries typed values: they must be of the field's type, as on the task routes.
        return body_model.model_validate(document, strict=True)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation_errors(exc.errors())) from None


def the_instances_asked_for(
    uids: list[tuple[str, str, str]], store: list[Literal["sr", "gsps"]]
) -> Callable[[list[DecodedImage]], None]:
    """Before the model runs: the PACS sent DICOM images, the ones asked for (study, series and instance:
    answers are stored into the study named in the path), and, if answers are to be stored, ones they can
    be anchored to."""

    def check(images: list[DecodedImage]) -> None:
        for image, asked in zip(images, uids, strict=True):
            if image.dicom is None:
                raise PacsError("the PACS sent an image that is not DICOM")
            sent = (
                image.dicom.study_instance_uid,
                image.dicom.series_instance_uid,
                image.dicom.sop_instance_uid,
            )
            if sent != asked:
                raise PacsError("the PACS sent another instance than the one asked for")
        if "sr" in store:
            anchorable_report(images)
        if "gsps" in store:
            anchorable_state(images)

    return check


async def store_answers(
    pacs: Dicomweb,
    store: list[Literal["sr", "gsps"]],
    task: Task[Any, Any],
    fields: TaskFields,
    parsed: Any,
    submitted: Submitted,
    study: str,
) -> list[StoredInstance]:
    """Build the objects asked for and store them into the study with one STOW-RS request."""
    if not store:
        return []
    kinds = list(dict.fromkeys(store))  # ["sr", "sr"] asks for one
    documents = []
    for kind in kinds:
        build = partial(dicom_answer, "gsps" if kind == "gsps" else "dicom", task, fields, parsed, submitted)
        documents.append(await in_pool(submitted.running.prepare_pool, build))
    confirmed = {reference.sop_instance_uid: reference for reference in await pacs.store(study, documents)}
    stored = []
    for kind, document in zip(kinds, documents, strict=True):
        header = pydicom.dcmread(io.BytesIO(document), stop_before_pixels=True)
        reference = confirmed.get(str(header.SOPInstanceUID))
        if reference is None:
            raise PacsError("the PACS confirmed storing other objects than those sent")
        stored.append(
            StoredInstance(
                object=kind,
                study_instance_uid=str(header.StudyInstanceUID),
                series_instance_uid=str(header.SeriesInstanceUID),
                sop_instance_uid=str(header.SOPInstanceUID),
                sop_class_uid=str(header.SOPClassUID),
                retrieve_url=reference.retrieve_url,
            )
        )
    return stored


DICOMWEB_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{status: TASK_ERROR_RESPONSES[status] for status in (400, 401, 408, 413, 415, 422, 429, 500)},
    404: {"model": ErrorResponse, "description": "The PACS has no instance with these UIDs."},
    502: {
        "model": ErrorResponse,
        "description": "The PACS could not be reached, refused the service's credentials, sent something else "
        "than the instance, or did not store the answer.",
    },
    503: {
        "model": ErrorResponse,
        "description": "Not ready, shutting down, or no PACS configured (MEDMO_DICOMWEB_URL).",
    },
    504: {
        "model": ErrorResponse,
        "description": "The PACS did not answer within MEDMO_DICOMWEB_TIMEOUT_S, or the request's deadline passed.",
    },
}

for _task in TASKS.values():
    router.add_api_route(
        f"/studies/{{study_instance_uid}}/series/{{series_instance_uid}}/instances/{{sop_instance_uid}}/{_task.name}",
        dicomweb_endpoint(_task),
        methods=["POST"],
        operation_id=f"dicomweb_{_task.name}",
        response_model=RESPONSE_MODELS[_task.name],
        responses=DICOMWEB_ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{REQUEST_MODELS[_task.name].__name__}"}
                    }
                },
            }
        },
        summary=f"{_task.summary}, fetched from the PACS by its UIDs; store the answer back if asked",
    )
