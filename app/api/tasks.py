"""POST /vqa, /report and /ground: one route per task, each a prompt, a shared pipeline and a parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response

from app.api.auth import require_api_key
from app.api.deps import get_service
from app.api.middleware import request_record
from app.api.negotiation import DICOM, wants_dicom
from app.api.openapi import TASK_ERROR_RESPONSES, task_request_body
from app.api.pipeline import TaskRun, in_prepare_pool, run_task
from app.api.uploads import FieldsT
from app.imaging import DicomSource
from app.outputs.dicom_sr import Author, grounding_report, radiology_report, vqa_report
from app.schemas import (
    GroundFields,
    GroundResponse,
    ReportFields,
    ReportResponse,
    VqaFields,
    VqaResponse,
)
from app.tasks.ground import ground_prompt, parse_findings
from app.tasks.report import parse_report, report_prompt
from app.tasks.vqa import parse_answer, vqa_prompt

TASK_FIELDS = (VqaFields, ReportFields, GroundFields)


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


@router.post(
    "/vqa",
    operation_id="vqa",
    response_model=VqaResponse,
    responses=TASK_ERROR_RESPONSES,
    openapi_extra=task_request_body(VqaFields),
    summary="Answer a clinical question about an image",
)
async def vqa(
    request: Request, x_request_timeout: RequestTimeout = None, x_request_id: RequestId = None
) -> VqaResponse | Response:
    as_dicom = wants_dicom(request.headers.get("accept"))
    run = await run_task(
        request, "vqa", VqaFields, vqa_prompt, x_request_timeout, dicom_source_required=as_dicom
    )
    answer = parse_answer(run.generation.text)
    if as_dicom:
        return await structured_report(
            request, run, lambda source, author: vqa_report(source, author, run.fields.question, answer)
        )
    return VqaResponse(**run.envelope(), answer=answer)


@router.post(
    "/report",
    operation_id="report",
    response_model=ReportResponse,
    responses=TASK_ERROR_RESPONSES,
    openapi_extra=task_request_body(ReportFields),
    summary="Write a radiology report (findings and impression) for an image",
)
async def report(
    request: Request, x_request_timeout: RequestTimeout = None, x_request_id: RequestId = None
) -> ReportResponse | Response:
    as_dicom = wants_dicom(request.headers.get("accept"))
    run = await run_task(
        request, "report", ReportFields, report_prompt, x_request_timeout, dicom_source_required=as_dicom
    )
    parsed = parse_report(run.generation.text)
    if as_dicom:
        return await structured_report(
            request,
            run,
            lambda source, author: radiology_report(source, author, parsed, run.fields.indication),
        )
    return ReportResponse(**run.envelope(), report=parsed)


@router.post(
    "/ground",
    operation_id="ground",
    response_model=GroundResponse,
    responses=TASK_ERROR_RESPONSES,
    openapi_extra=task_request_body(GroundFields),
    summary="Find and box abnormalities (or a named target) in an image",
)
async def ground(
    request: Request, x_request_timeout: RequestTimeout = None, x_request_id: RequestId = None
) -> GroundResponse | Response:
    as_dicom = wants_dicom(request.headers.get("accept"))
    convention = get_service(request).settings.box_convention
    run = await run_task(
        request,
        "ground",
        GroundFields,
        lambda fields: ground_prompt(fields, convention),
        x_request_timeout,
        dicom_source_required=as_dicom,
    )
    findings = parse_findings(run.generation.text, convention, run.model_input_size, run.image_size)
    if as_dicom:
        return await structured_report(
            request, run, lambda source, author: grounding_report(source, author, findings, run.fields.target)
        )
    return GroundResponse(
        **run.envelope(), findings=findings, box_convention=convention, raw_text=run.generation.text
    )


async def structured_report(
    request: Request, run: TaskRun[FieldsT], build: Callable[[DicomSource, Author], bytes]
) -> Response:
    """The result as a DICOM Structured Report in the source's study, built off the event loop."""
    source = run.image.dicom
    assert source is not None  # run_task refused non-DICOM uploads when a report was asked for
    author = Author(model=run.model, revision=run.revision)
    document = await in_prepare_pool(request, lambda: build(source, author))
    filename = f"medmo-{run.request_id}.dcm"
    return Response(
        document, media_type=DICOM, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )
