"""Probes, model information and metrics: what orchestrators and operators call."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.auth import require_api_key, require_api_key_for_metrics
from app.api.deps import get_running, get_service
from app.engine.protocol import EngineState
from app.schemas import EngineInfo, ErrorResponse, Health, Info, Limits
from app.tasks import TASKS

router = APIRouter(tags=["operations"])
# Liveness and readiness, also served alone on MEDMO_PROBE_PORT.
probes = APIRouter(tags=["operations"])

# Probes never take a key, so that an orchestrator needs no secret: an empty list is OpenAPI's "no
# security for this operation", declared rather than left out so that clients and linters need not guess.
NO_KEY: dict[str, Any] = {"security": []}


@probes.get(
    "/healthz",
    operation_id="healthz",
    response_model=Health,
    openapi_extra=NO_KEY,
    responses={503: {"model": Health, "description": "The inference worker has stopped: restart."}},
    summary="Liveness: the process is up and its inference worker has not died",
)
async def healthz(request: Request) -> JSONResponse:
    engine = get_service(request).engine
    if engine is not None and engine.state is EngineState.DEAD:
        return JSONResponse(Health(status="dead").model_dump(exclude_none=True), status_code=503)
    return JSONResponse(Health(status="ok").model_dump(exclude_none=True))


@probes.get(
    "/readyz",
    operation_id="readyz",
    response_model=Health,
    openapi_extra=NO_KEY,
    responses={
        503: {
            "model": Health,
            "description": "Starting (downloading, loading or warming up, with its progress), draining for "
            "shutdown, or stopped.",
        }
    },
    summary="Readiness: the model is loaded and requests are being taken",
)
async def readyz(request: Request) -> JSONResponse:
    service = get_service(request)
    engine = service.engine
    if engine is None:
        # Only the probe port (MEDMO_PROBE_PORT) answers this early: the main port opens once started.
        phase = service.startup.state
        health = (
            Health(status="starting")
            if phase is None
            else Health(status=phase.phase.value, progress=phase.percent)
        )
        return JSONResponse(health.model_dump(exclude_none=True), status_code=503)
    # A drain refuses new requests before the engine stops taking the accepted ones.
    state = (
        EngineState.DRAINING
        if service.accepted.closed and engine.state is EngineState.READY
        else engine.state
    )
    status = 200 if state is EngineState.READY else 503
    return JSONResponse(Health(status=state.value).model_dump(exclude_none=True), status_code=status)


@router.get(
    "/info",
    operation_id="info",
    response_model=Info,
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorResponse, "description": "A valid API key is required."}},
    summary="The model being served, its device and the limits in force",
)
async def info(request: Request) -> Info:
    running = get_running(request)
    service = running.service
    settings = service.settings
    described = running.runtime.description
    return Info(
        model=described.model,
        revision=described.revision,
        device=described.device,
        dtype=described.dtype,
        attn_implementation=described.attn_implementation,
        box_convention=settings.box_convention,
        engine=EngineInfo.model_validate(running.engine.describe()),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_images=settings.max_images,
            max_total_pixels=settings.max_total_pixels,
            max_context=settings.max_context,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            max_new_tokens={task: settings.max_new_tokens(task) for task in TASKS},
        ),
    )


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    dependencies=[Depends(require_api_key_for_metrics)],
    # A key only with MEDMO_METRICS_REQUIRE_KEY: the empty requirement says so to clients and scanners.
    openapi_extra={"security": [{}]},
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
        401: {"model": ErrorResponse, "description": "With MEDMO_METRICS_REQUIRE_KEY, a key is required."},
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    registry = get_service(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
