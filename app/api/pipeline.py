"""The path every task request takes: a first check of capacity, the upload, a place in the queue, decoding
and preparing, then the engine.

An overloaded server refuses a request before reading or decoding its upload. A request takes its place in
the queue only once its body has arrived: a client that stalls mid-upload holds an upload slot (bounded in
number and in rate, `uploads.py`), never a place that a ready request could use. Decoding and preparing
run in worker threads, overlapping with the model's work on other requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from fastapi import Request

from app.api.deps import get_running
from app.api.errors import ApiError
from app.api.middleware import request_record
from app.api.uploads import FieldsT, UploadLimits, read_task_upload
from app.engine.protocol import DeadlineExceededError, complete
from app.engine.request import Generation
from app.imaging import Cancellation, DecodedImage, DicomSource, ImageLimits, decode_image
from app.outputs.dicom_sr import check_report_source
from app.schemas import DicomInfo, ImageSize, TaskFields, TaskName, Timing, Usage, WindowInfo
from app.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class TaskRun(Generic[FieldsT]):
    request_id: str
    model: str
    revision: str | None
    fields: FieldsT
    image: DecodedImage
    model_input_size: tuple[int, int]
    generation: Generation
    queue_s: float
    inference_s: float
    started: float

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image.width, self.image.height

    def envelope(self) -> dict[str, Any]:
        """The response fields every task shares."""
        return {
            "request_id": self.request_id,
            "model": self.model,
            "image": ImageSize(width=self.image.width, height=self.image.height),
            "dicom": dicom_info(self.image.dicom),
            "usage": Usage(
                prompt_tokens=self.generation.prompt_tokens,
                completion_tokens=self.generation.completion_tokens,
            ),
            "timing": Timing(
                queue_ms=round(self.queue_s * 1000, 3),
                inference_ms=round(self.inference_s * 1000, 3),
                total_ms=round((time.monotonic() - self.started) * 1000, 3),
            ),
        }


async def run_task(
    request: Request,
    task: TaskName,
    fields_model: type[FieldsT],
    prompt: Callable[[FieldsT], str],
    timeout_s: float | None,
    *,
    dicom_source_required: bool = False,
) -> TaskRun[FieldsT]:
    """Run one task request through the model. With `dicom_source_required` (the client wants a DICOM
    Structured Report back), an upload that is not DICOM is refused before the model runs."""
    started = time.monotonic()
    running = get_running(request)
    service, runtime, engine = running.service, running.runtime, running.engine
    settings = service.settings
    loop = asyncio.get_running_loop()
    record = request_record(request)
    budget = settings.request_timeout_s if timeout_s is None else min(timeout_s, settings.request_timeout_s)
    deadline = started + budget
    limits = ImageLimits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        max_frames=settings.max_dicom_frames,
    )
    engine.check_admission()
    try:
        async with asyncio.timeout(budget):
            with service.uploads.take():
                upload = await read_task_upload(request, fields_model, upload_limits(settings))
            fields = upload.fields
            options = service.options(task, fields.max_new_tokens)
            with engine.admit() as admission:
                # CPU work, in a small pool of its own: it overlaps with the model's work.
                image = await decode_upload(request, running.prepare_pool, upload.image, limits, fields)
                record.image_width, record.image_height = image.width, image.height
                record.image_format = image.source_format
                record.modality = image.dicom.modality if image.dicom else None
                if dicom_source_required and image.dicom is None:
                    raise ApiError(
                        406, "not_acceptable", "a DICOM Structured Report can only answer a DICOM image"
                    )
                if dicom_source_required and image.dicom is not None:
                    check_report_source(image.dicom)  # 422 before any inference, not a 500 after it
                prepared = await loop.run_in_executor(
                    running.prepare_pool,
                    runtime.prepare,
                    image.picture,
                    prompt(upload.fields),
                    options,
                )
                completed = await cancel_on_disconnect(
                    request, complete(engine, admission, prepared, deadline_s=deadline)
                )
    except TimeoutError:
        service.metrics.rejections.labels(reason="deadline").inc()
        raise DeadlineExceededError() from None
    record.queue_ms = round(completed.queue_s * 1000, 3)
    record.batch_size = completed.batch_size
    service.metrics.generated_tokens.labels(task=task).inc(completed.generation.completion_tokens)
    return TaskRun(
        request_id=record.request_id,
        model=runtime.description.model,
        revision=runtime.description.revision,
        fields=upload.fields,
        image=image,
        model_input_size=prepared.model_input_size,
        generation=completed.generation,
        queue_s=completed.queue_s,
        inference_s=completed.inference_s,
        started=started,
    )


def upload_limits(settings: Settings) -> UploadLimits:
    return UploadLimits(
        max_image_bytes=settings.max_upload_bytes,
        timeout_s=settings.upload_timeout_s,
        min_bytes_per_s=settings.min_upload_bytes_per_s,
    )


async def decode_upload(
    request: Request, pool: Executor, data: bytes, limits: ImageLimits, fields: TaskFields
) -> DecodedImage:
    """Decode in the preparation pool. If the request is abandoned meanwhile (its deadline passes, its
    client goes), the decoder is told, and stops at its next step instead of finishing for nobody."""
    cancellation = Cancellation()
    decoding = asyncio.get_running_loop().run_in_executor(
        pool,
        partial(
            decode_image, data, limits, frame=fields.frame, window=fields.window, cancellation=cancellation
        ),
    )
    try:
        return await cancel_on_disconnect(request, decoding)
    finally:
        cancellation.cancel()


def dicom_info(source: DicomSource | None) -> DicomInfo | None:
    if source is None:
        return None
    window = source.window
    return DicomInfo(
        study_instance_uid=source.study_instance_uid,
        series_instance_uid=source.series_instance_uid,
        sop_instance_uid=source.sop_instance_uid,
        sop_class_uid=source.sop_class_uid,
        modality=source.modality,
        frame=source.frame,
        frames=source.frames,
        window=None
        if window is None
        else WindowInfo(center=window.center, width=window.width, source=window.source),
    )


async def in_prepare_pool(request: Request, work: Callable[[], T]) -> T:
    """Run CPU work (building a report, say) on the threads that decode and prepare uploads."""
    return await asyncio.get_running_loop().run_in_executor(get_running(request).prepare_pool, work)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but give it up if the client goes away first (its request is then never computed)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ApiError(499, "client_disconnected", "the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
