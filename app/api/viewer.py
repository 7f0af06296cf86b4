"""The viewer: a page at / for trying the service without writing a client, and the preview it shows.

The page is plain HTML, CSS and a small script shipped in the package (`app/static/viewer/`), with no
build step and nothing loaded from elsewhere, so it works on a hospital network with no way out. A browser
cannot display DICOM, so the page shows every upload through POST /preview: the image as the service
displays it (a DICOM windowed as asked), which is also what the model is given before its resize.
"""

from __future__ import annotations

from dataclasses import replace
from importlib.resources import files

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from app.api.auth import require_api_key
from app.api.deps import get_running
from app.api.middleware import request_record
from app.api.negotiation import PNG
from app.api.openapi import TASK_ERROR_RESPONSES, upload_request_body
from app.api.pipeline import ImageUpload, deadline, decode_uploads, in_pool, upload_limits
from app.api.tasks import RequestTimeout
from app.api.uploads import read_task_upload
from app.outputs import overlay
from app.schemas import ImageFields

ASSETS = files("app") / "static" / "viewer"
ASSETS_PATH = "/viewer-assets"


class PreviewFields(ImageFields):
    """How to display the image: the DICOM window and frame, as for the tasks."""


router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((ASSETS / "index.html").read_text(encoding="utf-8"))


@router.post(
    "/preview",
    operation_id="preview",
    tags=["viewer"],
    dependencies=[Depends(require_api_key)],
    response_class=Response,
    responses={
        **{
            status: TASK_ERROR_RESPONSES[status]
            for status in (400, 401, 403, 408, 413, 415, 422, 429, 503, 504)
        },
        200: {"content": {PNG: {"schema": {"type": "string", "format": "binary"}}}, "description": "PNG."},
    },
    openapi_extra=upload_request_body(PreviewFields),
    summary="The image as the service displays it (PNG), without running the model",
)
async def preview(request: Request, x_request_timeout: RequestTimeout = None) -> Response:
    """Decoding an upload is expensive work, so a preview comes in by the door a task does: refused at
    once when the queue is full or the service drains, a place in the queue while it decodes (counted in
    medmo_queue_depth, waited for by a drain), the request's deadline, and the same pixel limits. Previews
    hold at most half the queue's places and half the preparation threads: the rest stay for the model."""
    request_record(request).task = "preview"
    running = get_running(request)
    settings = running.service.settings
    running.engine.check_admission()
    async with deadline(request, x_request_timeout):
        with running.service.uploads.take():
            upload = await read_task_upload(
                request, PreviewFields, replace(upload_limits(settings), max_images=1)
            )
        (sent,) = upload.images
        with running.service.previews.take(), running.engine.admit():
            async with running.service.preview_decodes:
                (image,) = await decode_uploads(
                    request,
                    running.prepare_pool,
                    [ImageUpload(sent.data, frame=upload.fields.frame, window=upload.fields.window)],
                    settings,
                )
                picture = await in_pool(running.prepare_pool, lambda: overlay.encode(image.picture, PNG))
    return Response(picture, media_type=PNG)


def assets() -> StaticFiles:
    return StaticFiles(directory=str(ASSETS))
