"""The path every request for the model takes: a first check of capacity, the upload, a place in the queue,
decoding and preparing, then the engine.

An overloaded server refuses a request before reading or decoding its upload. A request takes its place in
the queue only once its body has arrived: a client that stalls mid-upload holds an upload slot (bounded in
number and in rate, `uploads.py`), never a place that a ready request could use. Decoding and preparing
run in worker threads, overlapping with the model's work on other requests. Everything that can refuse a
request happens before it is submitted, so a refused request gets its ordinary status, streamed or not.

A request may hold several images (and a chat none): they are decoded one after the other within one pixel
budget (MEDMO_MAX_TOTAL_PIXELS), shown in the order `image_order` asks, and asked about in one or more
queries (`app.conversation.Query`), each a sequence of its own in the engine with a place of its own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, TypeVar

from fastapi import Request
from pydantic import BaseModel

from app.api.deps import Running, get_running
from app.api.errors import ApiError
from app.api.middleware import RequestRecord, request_record
from app.api.priority import requested_priority
from app.api.uploads import UploadLimits
from app.conversation import Query
from app.engine.protocol import (
    Completed,
    DeadlineExceededError,
    Engine,
    RequestStream,
    WorkerDiedError,
)
from app.engine.request import GenerationOptions, PreparedRequest
from app.imaging import (
    Cancellation,
    DecodedImage,
    DicomSource,
    ImageLimits,
    TooManyPixelsError,
    decode_image,
)
from app.imaging.series import anatomical_order
from app.schemas import DicomInfo, ImageInfo, ImageSize, TaskFields, Timing, Usage, WindowInfo
from app.settings import PROMPT_ALLOWANCE, Settings
from app.tasks.classify import ChoiceQuery

T = TypeVar("T")

ImageOrder = Literal["anatomical", "as_sent"]
# Qwen3-VL feeds one token per 32x32 pixels of an image.
PIXELS_PER_TOKEN = 32 * 32


@dataclass(frozen=True)
class ImageUpload:
    """An image of a request as it arrived, what the client says it is, and how to display it if DICOM."""

    data: bytes
    caption: str | None = None
    frame: int | None = None
    window: str | None = None


@dataclass
class Generating:
    """One query of a request in the engine: what it asks, as prepared, and the stream of its tokens."""

    query: Query
    prepared: PreparedRequest
    events: RequestStream


@dataclass
class Submitted:
    """A request in the engine: what it was made from, and its queries' token streams."""

    running: Running
    record: RequestRecord
    arrived: float
    images: list[DecodedImage]  # as sent
    captions: list[str | None]
    order: list[int]  # indexes of `images` in the order the model is shown them
    queries: list[Generating]

    @property
    def first(self) -> Generating:
        return self.queries[0]

    def envelope(self, completed: Sequence[Completed]) -> dict[str, Any]:
        """The response fields every task shares, for its queries' results (in the order of `queries`)."""
        description = self.running.runtime.description
        first = self.images[0]
        return {
            "request_id": self.record.request_id,
            "model": description.model,
            "image": ImageSize(width=first.width, height=first.height),
            "images": [
                ImageInfo(
                    index=index,
                    shown_as=self.order.index(index) + 1,
                    caption=self.captions[index],
                    width=image.width,
                    height=image.height,
                    dicom=dicom_info(image.dicom),
                )
                for index, image in enumerate(self.images)
            ],
            "dicom": dicom_info(first.dicom),
            "usage": Usage(
                prompt_tokens=sum(c.generation.prompt_tokens for c in completed),
                completion_tokens=sum(c.generation.completion_tokens for c in completed),
            ),
            "finish_reason": "length"
            if any(c.generation.finish_reason == "length" for c in completed)
            else "stop",
            "timing": Timing(
                queue_ms=round(max(c.queue_s for c in completed) * 1000, 3),
                inference_ms=round(max(c.inference_s for c in completed) * 1000, 3),
                total_ms=round((time.monotonic() - self.arrived) * 1000, 3),
            ),
            "mean_logprob": self.mean_logprob(completed),
        }

    def mean_logprob(self, completed: Sequence[Completed]) -> float | None:
        """The mean log-probability of the answer's tokens over every query, when the request asked for
        log-probabilities (None otherwise). A chosen answer's tokens are those of the answer chosen."""
        total, count = 0.0, 0
        for generating, result in zip(self.queries, completed, strict=True):
            options, generation = generating.prepared.options, result.generation
            if options.logprobs is None:
                return None
            if generation.scores is not None and options.continuations is not None:
                best = max(range(len(generation.scores)), key=generation.scores.__getitem__)
                total += generation.scores[best]
                count += len(options.continuations[best])
            elif generation.logprobs is not None:
                total += math.fsum(token.logprob for token in generation.logprobs)
                count += len(generation.logprobs)
        return total / count if count else None

    def finished(self, completed: Sequence[Completed], group: str) -> None:
        """Account for a request the model has finished: access log and token metrics."""
        self.record.queue_ms = round(max(c.queue_s for c in completed) * 1000, 3)
        self.record.batch_size = max(c.batch_size for c in completed)
        metrics = self.running.service.metrics
        metrics.generated_tokens.labels(task=group).inc(
            sum(c.generation.completion_tokens for c in completed)
        )

    def ended_early(self, tokens: int, group: str) -> None:
        """Account for a request its reader ended before the model did (a stop sequence): its tokens so far."""
        self.running.service.metrics.generated_tokens.labels(task=group).inc(tokens)

    async def aclose(self) -> None:
        """Abandon whatever of the request is still generating."""
        for generating in self.queries:
            await generating.events.aclose()


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
    options: GenerationOptions,
    bounded: bool,
    uploads: Sequence[ImageUpload],
    queries: Callable[[list[DecodedImage], list[int]], list[Query]],
    deadline_s: float,
    deltas: bool,
    image_order: ImageOrder = "as_sent",
    check_images: Callable[[list[DecodedImage]], None] | None = None,
    choices: int = 1,
) -> Submitted:
    """Take a place, decode the uploads, prepare the queries they are asked in, and hand them to the engine.

    `queries` builds what the model is asked from the decoded images (as sent) and the order to show them
    in; `check_images` may refuse images before any inference is spent (a DICOM Structured Report that
    could not be anchored to them, say). `bounded`: `options.max_new_tokens` is an upper bound, lowered to
    what the context leaves after the prompt; otherwise the client asked for that many, and a prompt that
    leaves fewer is refused. `choices`: answers per query, each a sequence of its own sharing the query's
    prompt (and its prefill), the k-th sampled with seed + k.
    """
    running = get_running(request)
    service, engine = running.service, running.engine
    record = request_record(request)
    admissions = [engine.admit(options.priority)]
    try:
        images = await decode_uploads(request, running.prepare_pool, uploads, service.settings)
        first = images[0] if images else None
        record.images = len(images)
        if first is not None:
            record.image_width, record.image_height = first.width, first.height
            record.image_format = first.source_format
            record.modality = first.dicom.modality if first.dicom else None
        if check_images is not None:
            check_images(images)
        order = (
            anatomical_order([image.dicom.header if image.dicom else None for image in images])
            if image_order == "anatomical"
            else list(range(len(images)))
        )
        asked = queries(images, order)
        for _ in range(len(asked) * choices - 1):  # a place for each sequence; one refused gives all back
            admissions.append(engine.admit(options.priority))
        prompts = await asyncio.gather(
            *(
                in_pool(running.prepare_pool, partial(prepare, running, query, options, bounded=bounded))
                for query in asked
            )
        )
        prepared = [choice for prompt in prompts for choice in answers_to(prompt, choices)]
        asked = [query for query in asked for _ in range(choices)]
        generating: list[Generating] = []
        try:
            for admission, query, ready in zip(admissions, asked, prepared, strict=True):
                events = engine.submit(admission, ready, deadline_s=deadline_s, deltas=deltas)
                generating.append(Generating(query, ready, events))
        except BaseException:
            for started in generating:
                await started.events.aclose()
            raise
    except BaseException:
        for admission in admissions:
            admission.release()
        raise
    captions = [upload.caption for upload in uploads]
    return Submitted(running, record, arrived, images, captions, order, generating)


def task_options(request: Request, task: str, fields: TaskFields) -> GenerationOptions:
    """How a task request's answer is generated: its token limit, log-probabilities and priority, from the
    fields every task shares (and the X-Priority header)."""
    return get_running(request).service.options(
        task,
        fields.max_new_tokens,
        logprobs=fields.logprobs,
        priority=requested_priority(request, fields.priority),
    )


def client_texts(fields: BaseModel, captions: Sequence[str | None] = ()) -> list[tuple[str, str]]:
    """A request's texts, named as the client named them, for the text fence (`Running.text_fence`): its
    string fields, the strings of its list fields (labels.0, ...), and its images' captions."""
    texts: list[tuple[str, str]] = []
    for name, value in fields:
        if isinstance(value, str):
            texts.append((name, value))
        elif isinstance(value, list):
            texts += [(f"{name}.{index}", item) for index, item in enumerate(value) if isinstance(item, str)]
    texts += [(f"caption {number}", caption) for number, caption in enumerate(captions, start=1) if caption]
    return texts


def prepare(running: Running, query: Query, options: GenerationOptions, *, bounded: bool) -> PreparedRequest:
    """A query prepared for the model: its images fed at the size their share of the context allows,
    and its token limit fitted to what the context leaves, if it may be lowered. CPU work, for the pool."""
    settings = running.service.settings
    if isinstance(query, ChoiceQuery):
        # The answers are scored, not generated: the engine must hold the longest of them after the prompt,
        # and a prompt that leaves less room is refused rather than cut.
        continuations = tuple(running.runtime.answer_tokens(answer) for answer in query.answers)
        longest = max(len(tokens) for tokens in continuations)
        if longest > options.max_new_tokens:  # the task's limit bounds what one answer may take
            number = max(range(len(continuations)), key=lambda index: len(continuations[index]))
            raise ApiError(
                422,
                "invalid_request",
                f"{query.field}.{number}: {longest} tokens as an answer, at most {options.max_new_tokens} on this "
                f"server (MEDMO_{options.group.upper()}_MAX_NEW_TOKENS)",
            )
        options = replace(options, continuations=continuations, max_new_tokens=longest)
        bounded = False
    images = len(query.images)
    prepared = running.runtime.prepare(
        query.conversation,
        options,
        max_pixels=image_area(settings, images, options.max_new_tokens) if images > 1 else None,
    )
    if query.answer_shape is not None:
        prepared = running.runtime.constrained(prepared, query.answer_shape(prepared.model_input_sizes))
    room = fitting_tokens(running.engine, prepared)
    if bounded and room is not None and 1 <= room < options.max_new_tokens:
        return prepared.limited_to(room)
    return prepared


def answers_to(prompt: PreparedRequest, choices: int) -> list[PreparedRequest]:
    """`choices` requests of one prompt (the same prepared features: the engine computes it once), the
    k-th sampled with seed + k."""
    sampling = prompt.options.sampling
    return [
        replace(prompt, options=replace(prompt.options, sampling=replace(sampling, seed=sampling.seed + k)))
        for k in range(choices)
    ]


def image_area(settings: Settings, images: int, answer_tokens: int) -> int:
    """The most pixels each of `images` images is fed at, so that together with a prompt and an answer of
    `answer_tokens` they fit in MEDMO_MAX_CONTEXT: MEDMO_MAX_PIXELS when there is room, never less than
    MEDMO_MIN_PIXELS (a prompt that then still does not fit is refused as too long)."""
    room = settings.max_context - PROMPT_ALLOWANCE - answer_tokens
    share = room * PIXELS_PER_TOKEN // max(1, images)
    return max(settings.min_pixels, min(settings.max_pixels, share))


def fitting_tokens(engine: Engine, prepared: PreparedRequest) -> int | None:
    """The most tokens the engine can generate after this prompt; None if it has no fixed context."""
    if engine.context is None:
        return None
    return engine.context - prepared.prompt_tokens


async def collect(request: Request, submitted: Submitted) -> list[Completed]:
    """Wait for the results of all the request's queries; give them up if the client goes away first."""

    async def result(events: RequestStream) -> Completed:
        async for event in events:
            if isinstance(event, Completed):
                return event
        raise WorkerDiedError("the engine ended a stream without a result")

    async def results() -> list[Completed]:
        try:
            return list(await asyncio.gather(*(result(g.events) for g in submitted.queries)))
        finally:
            await submitted.aclose()

    return await cancel_on_disconnect(request, results())


def upload_limits(settings: Settings) -> UploadLimits:
    return UploadLimits(
        max_image_bytes=settings.max_upload_bytes,
        timeout_s=settings.upload_timeout_s,
        min_bytes_per_s=settings.min_upload_bytes_per_s,
        max_images=settings.max_images,
    )


async def decode_uploads(
    request: Request, pool: Executor, uploads: Sequence[ImageUpload], settings: Settings
) -> list[DecodedImage]:
    """Decode a request's images one after the other, each within what the pixel budget of them all
    (MEDMO_MAX_TOTAL_PIXELS) leaves: the images a request holds in memory are bounded together."""
    left = settings.max_total_pixels
    images = []
    for number, upload in enumerate(uploads, start=1):
        limits = ImageLimits(
            max_bytes=settings.max_upload_bytes,
            max_pixels=min(settings.max_image_pixels, left),
            max_frames=settings.max_dicom_frames,
        )
        try:
            image = await decode_upload(request, pool, upload, limits)
        except TooManyPixelsError as exc:
            if exc.pixels <= settings.max_image_pixels:  # the budget left, not the image, was too small
                raise ApiError(
                    413,
                    "image_too_large",
                    f"the images decode to more than {settings.max_total_pixels} pixels together "
                    f"(MEDMO_MAX_TOTAL_PIXELS): image {number} of {len(uploads)} would pass it",
                ) from None
            raise
        left -= image.width * image.height
        images.append(image)
    return images


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
