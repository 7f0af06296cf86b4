"""One POST route per task (`app/tasks/`): /vqa, /report, /ground, each answering JSON, a stream of
Server-Sent Events, or a DICOM Structured Report."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from app.api.auth import require_api_key
from app.api.deps import get_running
from app.api.errors import ApiError
from app.api.middleware import request_record
from app.api.negotiation import DICOM, IMAGES, Representation, representation
from app.api.openapi import TASK_ERROR_RESPONSES, task_request_body
from app.api.pipeline import ImageUpload, Submitted, collect, deadline, in_pool, submit, upload_limits
from app.api.streaming import TextStream, event_stream, task_events
from app.api.uploads import read_task_upload
from app.engine.protocol import Completed
from app.imaging import DecodedImage
from app.outputs import overlay
from app.outputs.dicom_sr import Author, check_report_source, structured_report
from app.outputs.gsps import check_presentation_source, presentation_state
from app.schemas import TaskFields
from app.tasks import TASKS
from app.tasks.base import Reading, Task


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


def task_endpoint(task: Task[Any, Any]) -> Callable[..., Coroutine[Any, Any, Response]]:
    async def endpoint(
        request: Request, x_request_timeout: RequestTimeout = None, x_request_id: RequestId = None
    ) -> Response:
        arrived = time.monotonic()
        wanted = representation(request.headers.get("accept"))
        if wanted in ("gsps", *IMAGES) and not task.draws:
            raise ApiError(406, "not_acceptable", f"/{task.name} draws no findings: ask for JSON")
        running = get_running(request)
        settings = running.service.settings
        running.engine.check_admission()
        async with deadline(request, x_request_timeout) as deadline_s:
            with running.service.uploads.take():
                upload = await read_task_upload(request, task.fields, upload_limits(settings))
            fields: TaskFields = upload.fields
            streaming = wanted == "events" or bool(fields.stream)
            if streaming and wanted not in ("events", "json"):
                raise ApiError(406, "not_acceptable", "only JSON answers stream: leave out stream")
            prompt = task.prompt(fields, settings.box_convention)
            submitted = await submit(
                request,
                arrived=arrived,
                group=task.name,
                upload=ImageUpload(upload.image, fields.frame, fields.window),
                max_new_tokens=fields.max_new_tokens,
                conversation=lambda image: running.runtime.messages(image.picture, prompt),
                deadline_s=deadline_s,
                deltas=streaming,
                check_image={"dicom": anchorable_report, "gsps": anchorable_state}.get(wanted),
            )
            reading = Reading(
                settings.box_convention, submitted.prepared.model_input_size, submitted.image_size
            )

            def result(completed: Completed) -> dict[str, Any]:
                submitted.finished(completed, task.name)
                parsed = task.parse(completed.generation.text, reading)
                answer = task.answer(parsed, completed.generation.text, reading)
                return task.response(**submitted.envelope(completed), **answer).model_dump(mode="json")

            if streaming:
                return event_stream(task_events(TextStream(submitted, task.name), result), submitted)
            completed = await collect(request, submitted)
        if wanted == "json":
            return JSONResponse(result(completed))
        submitted.finished(completed, task.name)
        parsed = task.parse(completed.generation.text, reading)
        return await drawn_or_filed(wanted, task, fields, parsed, submitted)

    endpoint.__name__ = task.name
    return endpoint


def anchorable_report(image: DecodedImage) -> None:
    """Refuse, before the model runs, an image a Structured Report cannot be anchored to: 406 for a picture,
    422 for a DICOM source that lacks what the report needs (not a 500 after the inference)."""
    if image.dicom is None:
        raise ApiError(406, "not_acceptable", "a DICOM answer (application/dicom) needs a DICOM image")
    check_report_source(image.dicom)


def anchorable_state(image: DecodedImage) -> None:
    """The same for a Grayscale Softcopy Presentation State, which also needs a grayscale image."""
    if image.dicom is None:
        raise ApiError(406, "not_acceptable", "a DICOM answer (application/dicom) needs a DICOM image")
    check_presentation_source(image.dicom)


def dicom_answer(
    kind: Literal["dicom", "gsps"],
    task: Task[Any, Any],
    fields: TaskFields,
    parsed: Any,
    submitted: Submitted,
) -> bytes:
    """The answer as a DICOM object in the source's study: a Structured Report (dicom) or a Grayscale
    Softcopy Presentation State (gsps). CPU work, for the preparation pool."""
    description = submitted.running.runtime.description
    author = Author(model=description.model, revision=description.revision)
    source = submitted.image.dicom
    assert source is not None  # anchorable_report / anchorable_state refused the rest before the model ran
    if kind == "gsps":
        return presentation_state(source, author, task.annotations(parsed) or [])
    return structured_report(source, author, task.report_content(fields, parsed, source), task.report_title)


async def drawn_or_filed(
    wanted: Representation, task: Task[Any, Any], fields: TaskFields, parsed: Any, submitted: Submitted
) -> Response:
    """The answer as a DICOM object for the source's study, or as the picture with its findings drawn,
    built off the event loop."""

    def build() -> bytes:
        if wanted == "dicom" or wanted == "gsps":
            return dicom_answer(wanted, task, fields, parsed, submitted)
        annotations = task.annotations(parsed) or []
        return overlay.encode(overlay.draw(submitted.image.picture, annotations), IMAGES[wanted])

    document = await in_pool(submitted.running.prepare_pool, build)
    if wanted in IMAGES:
        return Response(document, media_type=IMAGES[wanted])
    filename = f"medmo-{submitted.record.request_id}{'-gsps' if wanted == 'gsps' else ''}.dcm"
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
