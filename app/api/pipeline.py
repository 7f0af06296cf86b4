"""The path every request for the model takes: a first check of capacity, the upload, a place in the queue,
decoding and preparing, then the engine.

An overloaded server refuses a request before reading or decoding its upload. A request takes its place in
the queue only once its body has arrived: a client that stalls mid-upload holds an upload slot (bounded in
number and in rate, `uploads.py`), never a place that a ready request could use. Decoding and preparing
run in worker threads, overlapping with the model's work on other requests. Everything that can refuse a
request happens before it is submitted, so a refused request gets its ordinary status, streamed or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from fastapi import Request

from app.api.deps import Running, get_running
from app.api.errors import ApiError
from app.api.middleware import RequestRecord, request_record
from app.api.uploads import UploadLimits
from app.engine.protocol import Completed, DeadlineExceededError, RequestStream, WorkerDiedError
from app.engine.request import PreparedRequest
from app.imaging import Cancellation, DecodedImage, DicomSource, ImageLimits, decode_image
from app.schemas import DicomInfo, ImageSize, Timing, Usage, WindowInfo
from app.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class ImageUpload:
    """The image of a request as it arrived, and how to display it if it is DICOM."""

    data: bytes
    frame: int | None = None
    window: str | None = None


@dataclass
class Submitted:
    """A request in the engine: what it was made from, and the stream of its tokens."""

    running: Running
    record: RequestRecord
    arrived: float
    image: DecodedImage
    prepared: PreparedRequest
    events: RequestStream

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image.width, self.image.height

    def envelope(self, completed: Completed) -> dict[str, Any]:
        """The response fields every task shares."""
        description = self.running.runtime.description
        return {
            "request_id": self.record.request_id,
            "model": description.model,
            "image": ImageSize(width=self.image.width, height=self.image.height),
            "dicom": dicom_info(self.image.dicom),
            "usage": Usage(
                prompt_tokens=completed.generation.prompt_tokens,
                completion_tokens=completed.generation.completion_tokens,
            ),
            "timing": Timing(
                queue_ms=round(completed.queue_s * 1000, 3),
                inference_ms=round(completed.inference_s * 1000, 3),
                total_ms=round((time.monotonic() - self.arrived) * 1000, 3),
            ),
        }

    def finished(self, completed: Completed, group: str) -> None:
        """Account for a request the model has finished: access log and token metrics."""
        self.record.queue_ms = round(completed.queue_s * 1000, 3)
        self.record.batch_size = completed.batch_size
        metrics = self.running.service.metrics
        metrics.generated_tokens.labels(task=group).inc(completed.generation.completion_tokens)

    def ended_early(self, tokens: int, group: str) -> None:
        """Account for a request its reader ended before the model did (a stop sequence): its tokens so far."""
        self.running.service.metrics.generated_tokens.labels(task=group).inc(tokens)


@asynccontextmanager
async def deadline(request: Request, timeout_s: float | None) -> AsyncIterator[float]:
    """The request's deadline (time.monotonic()): the server's, lowered by the client's X-Request-Timeout.
    What is still running in this scope when it passes ends with 504."""
    settings = get_running(request).service.settings
    budget = settings.request_timeout_s if timeout_s is None else min(timeout_s, settings.request_timeout_s)
    try:
        async with asyncio.timeout(budget):
            yield time.monotonic() + budget
    except TimeoutError:
        get_running(request).service.metrics.rejections.labels(reason="deadline").inc()
        raise DeadlineExceededError() from None


async def submit(
    request: Request,
    *,
    arrived: float,
    group: str,
    upload: ImageUpload,
    max_new_tokens: int | None,
    conversation: Callable[[DecodedImage], list[dict[str, Any]]],
    deadline_s: float,
    deltas: bool,
    check_image: Callable[[DecodedImage], None] | None = None,
) -> Submitted:
    """Take a place, decode and prepare the upload, and hand it to the engine.

    `conversation` builds what the model is asked from the decoded image; `check_image` may refuse an image
    before any inference is spent (a DICOM Structured Report that could not be anchored to it, say).
    """
    running = get_running(request)
    service, runtime, engine = running.service, running.runtime, running.engine
    record = request_record(request)
    options = service.options(group, max_new_tokens)
    admission = engine.admit()
    try:
        image = await decode_upload(request, running.prepare_pool, upload, image_limits(service.settings))
        record.image_width, record.image_height = image.width, image.height
        record.image_format = image.source_format
        record.modality = image.dicom.modality if image.dicom else None
        if check_image is not None:
            check_image(image)
        prepared = await in_pool(
            running.prepare_pool, partial(runtime.prepare_conversation, conversation(image), options)
        )
        events = engine.submit(admission, prepared, deadline_s=deadline_s, deltas=deltas)
    except BaseException:
        admission.release()
        raise
    return Submitted(running, record, arrived, image, prepared, events)


async def collect(request: Request, submitted: Submitted) -> Completed:
    """Wait for the request's result; give it up if the client goes away first."""

    async def result() -> Completed:
        try:
            async for event in submitted.events:
                if isinstance(event, Completed):
                    return event
        finally:
            await submitted.events.aclose()
        raise WorkerDiedError("the engine ended a stream without a result")

    return await cancel_on_disconnect(request, result())


def upload_limits(settings: Settings) -> UploadLimits:
    return UploadLimits(
        max_image_bytes=settings.max_upload_bytes,
        timeout_s=settings.upload_timeout_s,
        min_bytes_per_s=settings.min_upload_bytes_per_s,
    )


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        max_frames=settings.max_dicom_frames,
    )


async def decode_upload(
    request: Request, pool: Executor, upload: ImageUpload, limits: ImageLimits
) -> DecodedImage:
    """Decode in the preparation pool. If the request is abandoned meanwhile (its deadline passes, its
    client goes), the decoder is told, and stops at its next step instead of finishing for nobody."""
    cancellation = Cancellation()
    decoding = in_pool(
        pool,
        partial(
            decode_image,
            upload.data,
            limits,
            frame=upload.frame,
            window=upload.window,
            cancellation=cancellation,
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


async def in_pool(pool: Executor, work: Callable[[], T]) -> T:
    """Run CPU work (decoding, preparing, building a report) on the threads that prepare uploads."""
    return await asyncio.get_running_loop().run_in_executor(pool, work)


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
