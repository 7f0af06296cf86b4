"""Tasks on images in the PACS, named by their UIDs: the service fetches them (WADO-RS), runs the task, and
when asked stores the answer back into the study (STOW-RS).

Two routes per task, at a DICOMweb path with the task appended:
- an instance: POST /dicomweb/studies/{study}/series/{series}/instances/{instance}/report, and so on;
- a series: POST /dicomweb/studies/{study}/series/{series}/report. The service lists the series' instances
  (QIDO-RS) and takes some as the Orthanc router would (`app/pacs/series_choice.py`): `instances` evenly
  spaced slices, or every instance; /report and /vqa may add the patient's latest prior of the same
  modality (`prior`, `app/pacs/series_pull.py`). All of them go to the model in one request.
The body is the task's JSON fields (as for POST /report, less `stream`) and `store`, what to file back.
A request goes through the same pipeline as the task routes, in the same order: admission before anything
is fetched, then the searches and fetches (bounded in time, and in bytes as an upload is, holding an upload
slot as an upload would), decoding, the queue, the model, and the store, all within the request's
deadline. The PACS is the one configured (MEDMO_DICOMWEB_URL); the UIDs in the path are checked to be DICOM
UIDs before any URL is made of them.

`store: ["sr"]` files the answer as a TID 1500 Measurement Report (what IHE AI Results consumers read: each
region and score a measurement group with its tracking identifier); `gsps`, for /ground, as a presentation
state. With MEDMO_FHIR_URL set, every answer is also sent to that FHIR server as a bundle (`app/pacs/fhir.py`:
POST {base}/Bundle, the PACS client's timeout, retries and no redirects), and the response's `fhir` says
whether it was taken. A FHIR server that fails does not fail the request: the model's answer and what was
stored in the PACS are returned, with the failure; a client retrying the whole request would run the model
and file into the PACS again.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import date
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
from app.api.negotiation import Representation
from app.api.openapi import TASK_ERROR_RESPONSES
from app.api.pipeline import (
    ImageUpload,
    Submitted,
    client_texts,
    collect,
    deadline,
    in_pool,
    submit,
    task_options,
    upload_limits,
)
from app.api.priority import early_priority
from app.api.tasks import (
    RequestId,
    RequestTimeout,
    anchorable_measurements,
    anchorable_state,
    bundle_answer,
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
    InstanceUids,
    PacsError,
    PacsNotConfiguredError,
    PacsSettings,
    ServerSettings,
)
from app.pacs.fhir import FhirServer
from app.pacs.series_choice import Asked, image_counts, instances_to_take
from app.pacs.series_pull import listed_series, prior_of
from app.schemas import SUBJECT_FIELDS, ErrorResponse, StoredInstance, TaskFields
from app.settings import Settings
from app.tasks import TASKS
from app.tasks.base import Task

logger = logging.getLogger("medmo.fhir")

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_api_key)])

# The task's fields and `store`: a few kilobytes at most.
MAX_BODY_BYTES = 64 * 1024
EXAMPLE_STUDY, EXAMPLE_SERIES = "1.2.840.113619.2.1", "1.2.840.113619.2.1.2"
EXAMPLE_INSTANCE = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
EXAMPLE_PRIOR_STUDY = "1.2.840.113619.2.1.7"
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
# /ground reads one image per query: boxes found on a prior's image would be findings of the past.
PRIOR_TASKS = frozenset({"report", "vqa"})


def _uid(description: str, example: str) -> Any:
    return Path(
        pattern=UID_PATTERN,
        min_length=1,
        max_length=UID_MAX_LENGTH,
        description=description,
        examples=[example],
    )


StudyUid = Annotated[str, _uid("Study Instance UID of the images in the PACS.", EXAMPLE_STUDY)]
SeriesUid = Annotated[str, _uid("Series Instance UID of the images in the PACS.", EXAMPLE_SERIES)]
InstanceUid = Annotated[str, _uid("SOP Instance UID of the image in the PACS.", EXAMPLE_INSTANCE)]

STORE_DESCRIPTION = (
    "What to store back into the study in the path, in the PACS (STOW-RS): sr, the answer as a DICOM "
    "Measurement Report (TID 1500, Comprehensive 3D SR){gsps}. Empty: nothing is stored."
)
INSTANCES_DESCRIPTION = (
    "How many of the series' instances to take, as the Orthanc router does: a number N, N evenly spaced "
    "through the series (slices by position along the slice normal, views by Instance Number; 1: the middle "
    "one; every one when the series holds no more), or all, every instance up to MEDMO_MAX_IMAGES (that many "
    "evenly spaced when it holds more). Default: 1 for CT, MR, PT and NM, all for other modalities (a study's "
    "views). A number above MEDMO_MAX_IMAGES is refused with 413 before anything is fetched."
)
PRIOR_DESCRIPTION = (
    "true: also take the patient's latest earlier study (Study Date before this one's) holding a series of "
    "this modality, its instances chosen by the same rule after the current ones, within MEDMO_MAX_IMAGES: "
    "the series keeps what it asked for but one place, the prior gets the room left, up to as many. The "
    "images are then captioned 'current, YYYY-MM-DD, ...' and 'prior, YYYY-MM-DD, ...'. Without such a "
    "study the request runs on the current series alone; prior_study_instance_uid says which was used."
)


def request_model(task: Task[Any, Any], *, series: bool = False) -> type[BaseModel]:
    """The JSON body of a task's DICOMweb route: its fields (less `stream`: the answer is one JSON), and
    `store`; for a series, also which instances to take (and for /report and /vqa, whether a prior too)."""
    kinds = Literal["sr", "gsps"] if task.draws else Literal["sr"]
    gsps = "; gsps, the findings as a Grayscale Softcopy Presentation State" if task.draws else ""
    # One JSON answer; one instance has no order to choose; the PACS's images say whose they are.
    left_out = ("stream", *SUBJECT_FIELDS) if series else ("stream", "image_order", *SUBJECT_FIELDS)
    fields: dict[str, Any] = {
        name: (info.annotation, info)
        for name, info in task.fields.model_fields.items()
        if name not in left_out
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
    if series:
        fields["instances"] = (
            Annotated[int, Field(ge=1)] | Literal["all"] | None,
            Field(None, description=INSTANCES_DESCRIPTION, examples=[5]),
        )
        if task.name in PRIOR_TASKS:
            fields["prior"] = (bool, Field(False, description=PRIOR_DESCRIPTION, examples=[True]))
    stem = task.fields.__name__.removesuffix("Fields")
    level = "Series" if series else ""
    return create_model(
        f"Dicomweb{level}{stem}Request",
        __config__=ConfigDict(
            extra="forbid", str_strip_whitespace=True, json_schema_extra=_without_null_defaults
        ),
        __doc__=f"/{task.name} on {'a series' if series else 'an image'} in the PACS: the task's fields, "
        f"{'which instances to take, ' if series else ''}and what to store back.",
        **fields,
    )


def _without_null_defaults(schema: dict[str, Any]) -> None:
    # A field left out and a null mean the same to the server; a declared default makes openapi-typescript,
    # which reads one as "always present", require the field of callers (as for the task routes' bodies).
    for field in schema.get("properties", {}).values():
        if "default" in field and field["default"] is None:
            del field["default"]


class SentBundle(BaseModel):
    """The answer's FHIR bundle, as the FHIR server (MEDMO_FHIR_URL) took it or not."""

    delivered: bool = Field(description="Whether the FHIR server took the bundle.", examples=[True])
    status: int | None = Field(
        description="The FHIR server's HTTP status; null when it could not be reached or did not answer in time.",
        examples=[201],
    )
    location: str | None = Field(
        description="Where the FHIR server says the stored Bundle is, as it wrote it; null if it did not say.",
        examples=["https://fhir.example.org/fhir/Bundle/8c1e/_history/1"],
    )
    error: str | None = Field(
        None,
        description="Why it was not taken; null when it was. The request still answers: the model's answer and "
        "what the PACS stored are in the response.",
        examples=[None],
    )


def response_model(task: Task[Any, Any]) -> type[BaseModel]:
    """The task's JSON answer, what was stored where, and what the FHIR server made of the bundle."""
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
        fhir=(
            SentBundle | None,
            Field(
                description="With MEDMO_FHIR_URL set: the answer as a FHIR R4 bundle, sent to that server "
                "(POST {base}/Bundle), and whether it took it. Null when no FHIR server is configured.",
                examples=[
                    {
                        "delivered": True,
                        "status": 201,
                        "location": "https://fhir.example.org/fhir/Bundle/8c1e/_history/1",
                    }
                ],
            ),
        ),
    )


def series_response_model(task: Task[Any, Any]) -> type[BaseModel]:
    """The instance route's answer; for a task that may take a prior, which prior study it took."""
    if task.name not in PRIOR_TASKS:
        return RESPONSE_MODELS[task.name]
    stem = task.fields.__name__.removesuffix("Fields")
    return create_model(
        f"DicomwebSeries{stem}Response",
        __base__=RESPONSE_MODELS[task.name],
        prior_study_instance_uid=(
            str | None,
            Field(
                description="The prior study whose images follow the current ones in `images` (captioned "
                "'prior, YYYY-MM-DD'); null when prior was not asked for or the PACS holds none.",
                examples=[EXAMPLE_PRIOR_STUDY],
            ),
        ),
    )


def instance_operation(task: Task[Any, Any]) -> str:
    return f"dicomweb_{task.name}"


def series_operation(task: Task[Any, Any]) -> str:
    return f"dicomweb_series_{task.name}"


# The routes' JSON bodies, by operation id: the app factory puts them all in the OpenAPI components.
REQUEST_MODELS = {
    **{instance_operation(task): request_model(task) for task in TASKS.values()},
    **{series_operation(task): request_model(task, series=True) for task in TASKS.values()},
}
RESPONSE_MODELS = {name: response_model(task) for name, task in TASKS.items()}
SERIES_RESPONSE_MODELS = {name: series_response_model(task) for name, task in TASKS.items()}


def fhir_server(settings: Settings) -> FhirServer | None:
    if settings.fhir_url is None:
        return None
    return FhirServer(
        ServerSettings(
            url=settings.fhir_url,
            credentials_file=settings.fhir_credentials_file,
            timeout_s=settings.dicomweb_timeout_s,
            retries=settings.dicomweb_retries,
        )
    )


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


# The body fields that say what to pull and store, not what to ask.
PACS_FIELDS = {"store", "instances", "prior"}
Pull = Callable[[Dicomweb, Settings, BaseModel], Awaitable["PulledImages"]]


def dicomweb_endpoint(task: Task[Any, Any]) -> Callable[..., Coroutine[Any, Any, Response]]:
    body_model, answer_model = REQUEST_MODELS[instance_operation(task)], RESPONSE_MODELS[task.name]

    async def endpoint(
        request: Request,
        study_instance_uid: StudyUid,
        series_instance_uid: SeriesUid,
        sop_instance_uid: InstanceUid,
        x_request_timeout: RequestTimeout = None,
        x_request_id: RequestId = None,
    ) -> Response:
        uids = InstanceUids(study_instance_uid, series_instance_uid, sop_instance_uid)

        async def pull(pacs: Dicomweb, settings: Settings, body: BaseModel) -> PulledImages:
            dicom = await pacs.retrieve_instance(uids.study, uids.series, uids.instance)
            return PulledImages([uids], [None], [dicom], prior_study_instance_uid=None)

        answer, _ = await pulled_and_answered(request, task, body_model, x_request_timeout, pull)
        return JSONResponse(answer_model(**answer).model_dump(mode="json"))

    endpoint.__name__ = instance_operation(task)
    return endpoint


def dicomweb_series_endpoint(task: Task[Any, Any]) -> Callable[..., Coroutine[Any, Any, Response]]:
    body_model = REQUEST_MODELS[series_operation(task)]
    answer_model = SERIES_RESPONSE_MODELS[task.name]

    async def endpoint(
        request: Request,
        study_instance_uid: StudyUid,
        series_instance_uid: SeriesUid,
        x_request_timeout: RequestTimeout = None,
        x_request_id: RequestId = None,
    ) -> Response:
        async def pull(pacs: Dicomweb, settings: Settings, body: BaseModel) -> PulledImages:
            asked: Asked = body.instances  # type: ignore[attr-defined]
            with_prior: bool = getattr(body, "prior", False)
            return await pull_series(
                pacs, settings, study_instance_uid, series_instance_uid, asked, with_prior=with_prior
            )

        answer, pulled = await pulled_and_answered(request, task, body_model, x_request_timeout, pull)
        if task.name in PRIOR_TASKS:
            answer["prior_study_instance_uid"] = pulled.prior_study_instance_uid
        return JSONResponse(answer_model(**answer).model_dump(mode="json"))

    endpoint.__name__ = series_operation(task)
    return endpoint


async def pulled_and_answered(
    request: Request,
    task: Task[Any, Any],
    body_model: type[BaseModel],
    timeout_s: float | None,
    pull: Pull,
) -> tuple[dict[str, Any], PulledImages]:
    """A DICOMweb request's way, in the order of an upload's: admission before anything is fetched, then
    the body and the images pulled from the PACS (holding an upload slot, as an upload would), then the
    task on them, all within the request's deadline. The task's JSON answer, and what was pulled."""
    arrived = time.monotonic()
    request_record(request).task = task.name
    running = get_running(request)
    settings = running.service.settings
    pacs = Dicomweb(pacs_settings(settings))
    running.engine.check_admission(early_priority(request))
    async with deadline(request, timeout_s) as deadline_s:
        with running.service.uploads.take():
            body = await read_body(request, body_model, settings)
            store: list[Literal["sr", "gsps"]] = body.store  # type: ignore[attr-defined]
            fields: TaskFields = task.fields.model_validate(body.model_dump(exclude=PACS_FIELDS))
            running.text_fence.check(client_texts(fields))
            pulled = await pull(pacs, settings, body)
        answer = await answer_on(request, task, fields, pulled, pacs, store, arrived, deadline_s)
    return answer, pulled


async def answer_on(
    request: Request,
    task: Task[Any, Any],
    fields: TaskFields,
    pulled: PulledImages,
    pacs: Dicomweb,
    store: list[Literal["sr", "gsps"]],
    arrived: float,
    deadline_s: float,
) -> dict[str, Any]:
    """Run the task on the images pulled from the PACS, through the same pipeline as an upload; store the
    answers asked for into the first image's study. The task's JSON answer, and what was stored."""
    running = get_running(request)
    convention = running.service.settings.box_convention
    submitted = await submit(
        request,
        arrived=arrived,
        options=task_options(request, task.name, fields),
        bounded=fields.max_new_tokens is None,
        uploads=[
            ImageUpload(dicom, caption, fields.frame, fields.window)
            for dicom, caption in zip(pulled.files, pulled.captions, strict=True)
        ],
        queries=lambda images, order: task.queries(
            fields,
            [
                Captioned(image.picture, caption)
                for image, caption in zip(images, pulled.captions, strict=True)
            ],
            order,
            convention,
        ),
        image_order=fields.image_order or "anatomical",
        deadline_s=deadline_s,
        deltas=False,
        check_images=the_instances_asked_for(pulled.instances, store),
    )
    return await answered_and_stored(request, task, fields, submitted, pacs, store, pulled.instances[0].study)


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


@dataclass(frozen=True)
class PulledImages:
    """What a series-level request runs on: the instances fetched, in the order sent, and their captions."""

    instances: list[InstanceUids]
    captions: list[str | None]
    files: list[bytes]
    prior_study_instance_uid: str | None


async def pull_series(
    pacs: Dicomweb, settings: Settings, study: str, series: str, asked: Asked, *, with_prior: bool
) -> PulledImages:
    """Choose the series' instances (and its prior's) by the Orthanc router's rule, within MEDMO_MAX_IMAGES
    images, then fetch them within MEDMO_MAX_UPLOAD_BYTES together, as an upload of several images is
    bounded."""
    limit = settings.max_images
    if isinstance(asked, int) and asked > limit:
        raise too_many_images(f"instances: {asked}", limit)
    if with_prior and limit < 2:
        raise too_many_images("a prior's images and the series'", limit)
    current = await listed_series(pacs, study, series)
    prior = await prior_of(pacs, current) if with_prior else None
    # What the series can give, not what was asked for: a prior then gets the places its views leave.
    wanted = min(instances_to_take(asked, current.modality, limit), current.available)
    current_count, prior_count = image_counts(wanted, limit, with_prior=prior is not None)
    instances, captions = current.taken(current_count)
    if prior is not None:
        earlier, earlier_labels = prior.series.taken(prior_count)
        instances += earlier
        captions = [
            *(dated("current", prior.current_date, label) for label in captions),
            *(dated("prior", prior.prior_date, label) for label in earlier_labels),
        ]
    files = await pacs.retrieve_instances(instances, settings.max_upload_bytes)
    return PulledImages(instances, captions, files, prior.series.study if prior else None)


def too_many_images(asked: str, limit: int) -> ApiError:
    return ApiError(
        413,
        "too_many_images",
        f"{asked}: more than the {limit} images a request may hold on this server (MEDMO_MAX_IMAGES)",
    )


def dated(when: Literal["current", "prior"], day: date, label: str | None) -> str:
    """A caption that tells a current image from a prior's: "prior, 2024-01-05, PA"."""
    return ", ".join(part for part in (when, day.isoformat(), label) if part)


def the_instances_asked_for(
    asked: list[InstanceUids], store: list[Literal["sr", "gsps"]]
) -> Callable[[list[DecodedImage]], None]:
    """Before the model runs: the PACS sent DICOM images, the ones asked for (study, series and instance:
    answers are stored into the study named in the path), and, if answers are to be stored, ones they can
    be anchored to."""

    def check(images: list[DecodedImage]) -> None:
        for image, uids in zip(images, asked, strict=True):
            if image.dicom is None:
                raise PacsError("the PACS sent an image that is not DICOM")
            sent = InstanceUids(
                image.dicom.study_instance_uid,
                image.dicom.series_instance_uid,
                image.dicom.sop_instance_uid,
            )
            if sent != uids:
                raise PacsError("the PACS sent another instance than the one asked for")
        if "sr" in store:
            anchorable_measurements(images)
        if "gsps" in store:
            anchorable_state(images)

    return check


async def answered_and_stored(
    request: Request,
    task: Task[Any, Any],
    fields: TaskFields,
    submitted: Submitted,
    pacs: Dicomweb,
    store: list[Literal["sr", "gsps"]],
    study: str,
) -> dict[str, Any]:
    """Wait for the model, store what was asked into the study in the path (the first image's), and the
    response's fields."""
    convention = submitted.running.service.settings.box_convention
    completed = await collect(request, submitted)
    submitted.finished(completed, task.name)
    parsed = read_answer(task, submitted, completed, convention)
    texts = [c.generation.text for c in completed]
    stored = await store_answers(pacs, store, task, fields, parsed, texts, submitted, study)
    sent = await send_bundle(task, fields, parsed, texts, submitted)
    answer = task.answer(parsed, texts, convention)
    return {**submitted.envelope(completed), **answer, "stored": stored, "fhir": sent}


async def send_bundle(
    task: Task[Any, Any], fields: TaskFields, parsed: Any, texts: list[str], submitted: Submitted
) -> SentBundle | None:
    """Send the answer's bundle to the configured FHIR server, if there is one; what became of it."""
    server = fhir_server(submitted.running.service.settings)
    if server is None:
        return None
    bundle = await in_pool(
        submitted.running.prepare_pool, partial(bundle_answer, task, fields, parsed, texts, submitted)
    )
    try:
        receipt = await server.send_bundle(bundle)
    except PacsError as exc:  # its message names the failure, never a URL or the patient
        logger.warning("FHIR: the bundle was not taken: %s", exc)
        return SentBundle(delivered=False, status=exc.status, location=None, error=str(exc))
    return SentBundle(delivered=True, status=receipt.status, location=receipt.location, error=None)


async def store_answers(
    pacs: Dicomweb,
    store: list[Literal["sr", "gsps"]],
    task: Task[Any, Any],
    fields: TaskFields,
    parsed: Any,
    texts: list[str],
    submitted: Submitted,
    study: str,
) -> list[StoredInstance]:
    """Build the objects asked for and store them into the study with one STOW-RS request."""
    if not store:
        return []
    kinds = list(dict.fromkeys(store))  # ["sr", "sr"] asks for one
    documents = []
    for kind in kinds:
        wanted: Representation = "gsps" if kind == "gsps" else "measurement_report"
        build = partial(dicom_answer, wanted, task, fields, parsed, texts, submitted)
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
    **{status: TASK_ERROR_RESPONSES[status] for status in (400, 401, 403, 408, 413, 415, 422, 429, 500)},
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
SERIES_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **DICOMWEB_ERROR_RESPONSES,
    404: {
        "model": ErrorResponse,
        "description": "The PACS has no series with these UIDs, or no instance in it (not_found).",
    },
    413: {
        "model": ErrorResponse,
        "description": "More instances than MEDMO_MAX_IMAGES asked for (too_many_images, refused before "
        "anything is fetched), the instances larger together than MEDMO_MAX_UPLOAD_BYTES (image_too_large), or "
        "a body or decoded image larger than allowed.",
    },
    502: {
        "model": ErrorResponse,
        "description": "The PACS could not be reached, refused the service's credentials, answered a search "
        "with something else than DICOM JSON, sent something else than the instances listed, or did not "
        "store the answer.",
    },
}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


for _task in TASKS.values():
    router.add_api_route(
        f"/studies/{{study_instance_uid}}/series/{{series_instance_uid}}/instances/{{sop_instance_uid}}/{_task.name}",
        dicomweb_endpoint(_task),
        methods=["POST"],
        operation_id=instance_operation(_task),
        response_model=RESPONSE_MODELS[_task.name],
        responses=DICOMWEB_ERROR_RESPONSES,
        openapi_extra=_json_body(REQUEST_MODELS[instance_operation(_task)]),
        summary=f"{_task.summary}, fetched from the PACS by its UIDs; store the answer back if asked",
    )
    router.add_api_route(
        f"/studies/{{study_instance_uid}}/series/{{series_instance_uid}}/{_task.name}",
        dicomweb_series_endpoint(_task),
        methods=["POST"],
        operation_id=series_operation(_task),
        response_model=SERIES_RESPONSE_MODELS[_task.name],
        responses=SERIES_ERROR_RESPONSES,
        openapi_extra=_json_body(REQUEST_MODELS[series_operation(_task)]),
        summary=f"{_task.summary}, on instances of a series chosen and fetched from the PACS"
        + (", with its prior if asked" if _task.name in PRIOR_TASKS else "")
        + "; store the answer back if asked",
    )
