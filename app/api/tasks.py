"""POST /vqa, /report and /ground: one route per task, each a prompt, a shared pipeline and a parser."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from app.api.deps import get_service
from app.api.openapi import TASK_ERROR_RESPONSES, task_request_body
from app.api.pipeline import run_task
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

router = APIRouter(tags=["tasks"])

RequestTimeout = Annotated[
    float | None,
    Header(
        alias="X-Request-Timeout",
        gt=0,
        description="Seconds this request may take in all; can only lower the server's deadline.",
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
    response_model=VqaResponse,
    responses=TASK_ERROR_RESPONSES,
    openapi_extra=task_request_body(VqaFields),
    summary="Answer a clinical question about an image",
)
async def vqa(
    request: Request, x_request_timeout: RequestTimeout = None, x_request_id: RequestId = None
) -> VqaResponse:
    run = await run_task(request, "vqa", VqaFields, vqa_prompt, x_request_timeout)
    return VqaResponse(**run.envelope(), answer=parse_answer(run.generation.text))


@router.post(
    "/report",
    response_model=ReportResponse,
    responses=TASK_ERROR_RESPONSES,
    openapi_extra=task_request_body(ReportFields),
    summary="Write a radiology report (findings and impression) for an image",
)
async def report(
    request: Request, x_request_timeout: RequestTimeout = None, x_request_id: RequestId = None
) -> ReportResponse:
    run = await run_task(request, "report", ReportFields, report_prompt, x_request_timeout)
    return ReportResponse(**run.envelope(), report=parse_report(run.generation.text))


@router.post(
    "/ground",
    response_model=GroundResponse,
    responses=TASK_ERROR_RESPONSES,
    openapi_extra=task_request_body(GroundFields),
    summary="Find and box abnormalities (or a named target) in an image",
)
async def ground(
    request: Request, x_request_timeout: RequestTimeout = None, x_request_id: RequestId = None
) -> GroundResponse:
    convention = get_service(request).settings.box_convention
    run = await run_task(
        request, "ground", GroundFields, lambda fields: ground_prompt(fields, convention), x_request_timeout
    )
    findings = parse_findings(run.generation.text, convention, run.model_input_size, run.image_size)
    return GroundResponse(
        **run.envelope(), findings=findings, box_convention=convention, raw_text=run.generation.text
    )
