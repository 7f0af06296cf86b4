"""One POST route per task (`app/tasks/`): /vqa, /report, /ground, /classify, each taking one image or
several and answering JSON, a stream of Server-Sent Events, a DICOM object (a TID 1500 Measurement Report,
or asked for by name a TID 2000 Structured Report), a FHIR R4 Bundle (and for /ground, a picture of one
image with its findings drawn, or a presentation state).

What a DICOM or FHIR answer needs of the images (headers it can be anchored to, one patient, no subject
fields beside a DICOM header) is checked after decoding and before the model runs: a source that cannot
be answered in the standard asked for is a 4xx that spends no inference."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from app.api.auth import require_api_key
from app.api.deps import get_running
from app.api.errors import ApiError
from app.api.middleware import request_record
from app.api.negotiation import DICOM, DICOM_ANSWERS, IMAGES, Representation, representation
from app.api.openapi import TASK_ERROR_RESPONSES, task_request_body
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
from app.api.streaming import TextStream, event_stream, task_events
from app.api.uploads import UploadedImage, read_task_upload
from app.conversation import Captioned
from app.engine.protocol import Completed
from app.imaging import DecodedImage, DicomSource
from app.outputs import overlay
from app.outputs.dicom_sr import Author, check_one_patient, check_report_sources, structured_report
from app.outputs.fhir import FHIR_JSON, SubjectIdentity, fhir_bundle
from app.outputs.gsps import check_presentation_sources, presentation_state
from app.outputs.measurement_report import check_measurement_sources, measurement_report
from app.outputs.results import Algorithm
from app.schemas import SUBJECT_FIELDS, BoxConvention, TaskFields
from app.tasks import TASKS
from app.tasks.base import Reading, Task
from app.tasks.classify import Choice, ChoiceQuery


def count_as_task(request: Request) -> None:
    """Name the task on the request's record first, so that refusals (401, 406, ...) count per task too."""
    request_record(request).task = request.scope["route"].path.strip("/")


router = APIRouter(tags=["tasks"], dependencies=[Depends(count_as_task), Depends(require_api_key)])

RequestTimeout = Annotated[
    float | None,
    Header(
        alias="X-Request-Timeout",
        ge=1,
        le=86_400,
        description="Seconds this request may take in all, at least 1; can only lower the server's deadline.",
    ),
]
RequestId = Annotated[
    str | None,
    Header(
        alias="X-Request-ID",
        description="Your identifier for this request (letters, digits, '.', '_', ':', '-'; up to 128), "
        "echoed in the response and the server's log. Generated when absent or malformed.",
    ),
]


PictureIndex = Annotated[
    int | None,
    Query(
        alias="image",
        ge=0,
        le=63,
        description="With Accept: image/png or image/jpeg: which image (its index as sent, 0 for the first) to "
        "draw with its findings. Default: the first.",
    ),
]


def task_endpoint(task: Task[Any, Any]) -> Callable[..., Coroutine[Any, Any, Response]]:
    async def endpoint(
        request: Request,
        x_request_timeout: RequestTimeout = None,
        x_request_id: RequestId = None,
        picture_index: PictureIndex = None,
    ) -> Response:
        arrived = time.monotonic()
        wanted = representation(request.headers.get("accept"))
        if wanted in ("gsps", *IMAGES) and not task.draws:
            raise ApiError(406, "not_acceptable", f"/{task.name} draws no findings: ask for JSON")
        if picture_index is not None and wanted not in IMAGES:
            raise ApiError(
                422, "invalid_request", "image: chooses the image a picture answer draws (Accept: image/png)"
            )
        running = get_running(request)
        settings = running.service.settings
        running.engine.check_admission(early_priority(request))
        async with deadline(request, x_request_timeout) as deadline_s:
            with running.service.uploads.take():
                upload = await read_task_upload(request, task.fields, upload_limits(settings))
            fields: TaskFields = upload.fields
            running.text_fence.check(client_texts(fields, [image.caption for image in upload.images]))
            streaming = wanted == "events" or bool(fields.stream)
            if streaming and wanted not in ("events", "json"):
                raise ApiError(406, "not_acceptable", "only JSON answers stream: leave out stream")
            convention = settings.box_convention
            submitted = await submit(
                request,
                arrived=arrived,
                options=task_options(request, task.name, fields),
                bounded=fields.max_new_tokens is None,
                uploads=[
                    ImageUpload(image.data, image.caption, fields.frame, fields.window)
                    for image in upload.images
                ],
                queries=lambda images, order: task.queries(
                    fields, captioned(images, upload.images), order, convention
                ),
                image_order=fields.image_order or "anatomical",
                deadline_s=deadline_s,
                deltas=streaming,
                check_images=answerable(wanted, picture_index, fields),
            )

            def result(completed: list[Completed]) -> dict[str, Any]:
                submitted.finished(completed, task.name)
                parsed = read_answer(task, submitted, completed, convention)
                texts = [c.generation.text for c in completed]
                answer = task.answer(parsed, texts, convention)
                return task.response(**submitted.envelope(completed), **answer).model_dump(mode="json")

            if streaming:
                streams = [TextStream(submitted, generating, task.name) for generating in submitted.queries]
                return event_stream(task_events(streams, result), submitted)
            completed = await collect(request, submitted)
        if wanted == "json":
            return JSONResponse(result(completed))
        submitted.finished(completed, task.name)
        parsed = read_answer(task, submitted, completed, convention)
        texts = [c.generation.text for c in completed]
        return await drawn_or_filed(wanted, task, fields, parsed, texts, submitted, picture_index or 0)

    endpoint.__name__ = task.name
    return endpoint


def captioned(images: list[DecodedImage], uploaded: list[UploadedImage]) -> list[Captioned]:
    return [Captioned(image.picture, sent.caption) for image, sent in zip(images, uploaded, strict=True)]


def read_answer(
    task: Task[Any, Any], submitted: Submitted, completed: list[Completed], convention: BoxConvention
) -> Any:
    """What the model wrote for each of the request's queries, read by the task as one answer; for a query
    answered by choosing, the answers it was given with their scores (`Choice`)."""
    parsed = []
    for generating, result in zip(submitted.queries, completed, strict=True):
        if isinstance(generating.query, ChoiceQuery):
            parsed.append(chosen(generating.query, result))
            continue
        index = generating.query.images[0]  # the image its boxes are on, when it grounds one
        image = submitted.images[index]
        reading = Reading(
            convention,
            generating.prepared.model_input_sizes[0],
            (image.width, image.height),
            image_index=index,
            sop_instance_uid=image.dicom.sop_instance_uid if image.dicom else None,
            frame=image.dicom.frame if image.dicom else None,
        )
        parsed.append(task.parse(result.generation.text, reading))
    return task.combine(parsed)


def chosen(query: ChoiceQuery, result: Completed) -> Choice:
    scores = result.generation.scores
    if scores is None or len(scores) != len(query.answers):
        raise RuntimeError("the engine did not score the answers it was given")
    return Choice(query.answers, scores)


def answerable(
    wanted: Representation, picture_index: int | None, fields: TaskFields
) -> Callable[[list[DecodedImage]], None]:
    """Before the model runs: refuse what the answer asked for cannot be made of these images."""

    def check(images: list[DecodedImage]) -> None:
        if picture_index is not None and picture_index >= len(images):
            raise ApiError(
                422,
                "invalid_request",
                f"image: {picture_index} names no image; the request has {len(images)}",
            )
        check_subject(fields, images)
        if wanted == "measurement_report":
            anchorable_measurements(images)
        elif wanted == "basic_report":
            anchorable_report(images)
        elif wanted == "gsps":
            anchorable_state(images)
        elif wanted == "fhir":
            check_one_patient([image.dicom for image in images if image.dicom is not None])

    return check


def check_subject(fields: TaskFields, images: Sequence[DecodedImage]) -> None:
    """The subject fields name the patient and study of images without a header: with a DICOM image, the
    header says who the patient is, and two answers to that question are refused rather than chosen from."""
    given = [name for name in SUBJECT_FIELDS if getattr(fields, name, None) is not None]
    if not given:
        return
    if any(image.dicom is not None for image in images):
        raise ApiError(
            422,
            "invalid_request",
            f"{', '.join(given)}: for images without a DICOM header only; a DICOM image's header says "
            "whose and which study it is",
        )
    if fields.patient_id_issuer is not None and fields.patient_id is None:
        raise ApiError(
            422, "invalid_request", "patient_id_issuer: says who assigned patient_id, which is missing"
        )


def subject_of(fields: TaskFields) -> SubjectIdentity | None:
    """The client's subject fields, for images without a DICOM header; None when it gave none."""
    if all(getattr(fields, name, None) is None for name in SUBJECT_FIELDS):
        return None
    return SubjectIdentity(
        patient_id=fields.patient_id,
        issuer=fields.patient_id_issuer,
        accession_number=fields.accession_number,
        study_instance_uid=fields.study_instance_uid,
    )


def dicom_sources(images: list[DecodedImage]) -> list[DicomSource]:
    """Every image's DICOM source; 406 if one is not DICOM (an answer in DICOM references them all)."""
    sources = [image.dicom for image in images]
    if any(source is None for source in sources):
        raise ApiError(
            406,
            "not_acceptable",
            "a DICOM answer (application/dicom) needs DICOM images"
            + (", every one of them" if len(images) > 1 else ""),
        )
    return [source for source in sources if source is not None]


def anchorable_report(images: list[DecodedImage]) -> None:
    """Refuse, before the model runs, images a Structured Report cannot be anchored to: 406 for a picture,
    422 for DICOM sources that lack what the report needs (not a 500 after the inference)."""
    check_report_sources(dicom_sources(images))


def anchorable_measurements(images: list[DecodedImage]) -> None:
    """The same for a TID 1500 Measurement Report, whose image library reads a little more of each header."""
    check_measurement_sources(dicom_sources(images))


def anchorable_state(images: list[DecodedImage]) -> None:
    """The same for a Grayscale Softcopy Presentation State, which also needs grayscale images of one study."""
    check_presentation_sources(dicom_sources(images))


def algorithm_of(submitted: Submitted) -> Algorithm:
    description = submitted.running.runtime.description
    return Algorithm(model=description.model, revision=description.revision)


def dicom_answer(
    kind: Representation,
    task: Task[Any, Any],
    fields: TaskFields,
    parsed: Any,
    texts: Sequence[str],
    submitted: Submitted,
) -> bytes:
    """The answer as a DICOM object in the first source's study: a TID 1500 Measurement Report, a TID 2000
    Structured Report (basic_report) or a Grayscale Softcopy Presentation State (gsps). CPU work, for the
    preparation pool."""
    algorithm = algorithm_of(submitted)
    # The checks before the model refused images that are not all DICOM.
    sources = dicom_sources(submitted.images)
    if kind == "measurement_report":
        results = task.results(fields, parsed, texts)
        return measurement_report(sources, results, algorithm, title=task.report_title)
    author = Author(model=algorithm.model, revision=algorithm.revision)
    if kind == "gsps":
        return presentation_state(sources, author, task.annotations(parsed) or [])
    if kind == "basic_report":
        return structured_report(
            sources, author, task.report_content(fields, parsed, sources), task.report_title
        )
    raise ValueError(f"{kind} is not a DICOM answer")


def bundle_answer(
    task: Task[Any, Any], fields: TaskFields, parsed: Any, texts: Sequence[str], submitted: Submitted
) -> dict[str, Any]:
    """The answer as a FHIR R4 collection Bundle (JSON-ready): the patient from the DICOM headers, or from
    the client's subject fields for other images, or none. CPU work, for the preparation pool."""
    return fhir_bundle(
        task.results(fields, parsed, texts),
        [image.dicom for image in submitted.images],
        algorithm_of(submitted),
        subject=subject_of(fields),
    )


async def drawn_or_filed(
    wanted: Representation,
    task: Task[Any, Any],
    fields: TaskFields,
    parsed: Any,
    texts: Sequence[str],
    submitted: Submitted,
    picture_index: int,
) -> Response:
    """The answer as a DICOM object for the sources' study, a FHIR bundle, or one image (`picture_index`)
    with its findings drawn, built off the event loop."""

    def build() -> bytes:
        if wanted in DICOM_ANSWERS:
            return dicom_answer(wanted, task, fields, parsed, texts, submitted)
        if wanted == "fhir":
            return json.dumps(bundle_answer(task, fields, parsed, texts, submitted)).encode()
        annotations = [a for a in task.annotations(parsed) or [] if a.image == picture_index]
        picture = submitted.images[picture_index].picture
        return overlay.encode(overlay.draw(picture, annotations), IMAGES[wanted])

    document = await in_pool(submitted.running.prepare_pool, build)
    if wanted in IMAGES:
        return Response(document, media_type=IMAGES[wanted])
    if wanted == "fhir":
        return Response(document, media_type=FHIR_JSON)
    suffix = {"gsps": "-gsps", "basic_report": "-sr"}.get(wanted, "")
    filename = f"medmo-{submitted.record.request_id}{suffix}.dcm"
    return Response(
        document, media_type=DICOM, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


for _task in TASKS.values():
    router.add_api_route(
        f"/{_task.name}",
        task_endpoint(_task),
        methods=["POST"],
        operation_id=_task.name,
        response_model=_task.response,
        responses=TASK_ERROR_RESPONSES,
        openapi_extra=task_request_body(_task.fields, draws=_task.draws),
        summary=_task.summary,
    )
