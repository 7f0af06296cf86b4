"""OpenAI-compatible chat: POST /v1/chat/completions and GET /v1/models.

The protocol the largest ecosystem of vision-language clients speaks (the `openai` SDKs, LangChain, chat
front-ends, evaluation harnesses), for what MedMO can do: a conversation (system messages, earlier
assistant turns) holding any number of images up to MEDMO_MAX_IMAGES, or none, each a `data:` URI
(base64 PNG, JPEG or DICOM; the service never fetches a URL), answered greedily, whole or streamed in
OpenAI's chunk format. max_tokens is an upper bound: a request asking for more than the context holds
after its prompt is served up to what fits, ending with finish_reason "length". A parameter MedMO cannot honour is refused in OpenAI's error shape,
never ignored. The same keys (Bearer), admission, limits and deadlines apply as on the task routes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api.auth import require_api_key
from app.api.chat_models import (
    NEUTRAL,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    CompletionUsage,
    ModelCard,
    ModelList,
    OpenAIError,
    TextPart,
)
from app.api.deps import get_running
from app.api.errors import ApiError, Failure, classify, openai_error
from app.api.middleware import request_record
from app.api.negotiation import EVENTS
from app.api.pipeline import ImageUpload, Submitted, cancel_on_disconnect, deadline, submit, upload_limits
from app.api.streaming import TextStream, event_stream, sse
from app.api.uploads import decode_base64_image, read_json_object
from app.conversation import Conversation, Query, Role, Turn
from app.engine.protocol import Completed
from app.engine.request import GenerationOptions
from app.imaging import DecodedImage
from app.text.fence import QUOTED_CHARS

GROUP = "chat"
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64


def count_as_chat(request: Request) -> None:
    request_record(request).task = GROUP


router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(count_as_chat), Depends(require_api_key)]
)


CHAT_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": description}
    for status, description in {
        400: "Invalid or unsupported request.",
        401: "A valid API key is required.",
        403: "Sent from a page on another origin than the service's own or MEDMO_CORS_ORIGINS.",
        404: "No such model.",
        413: "Body or image larger than allowed.",
        415: "Content-Type not application/json, or image format not supported.",
        422: "Invalid field or an image the model cannot use.",
        429: "Queue full; retry after Retry-After seconds.",
        503: "Not ready, shutting down, or the inference worker stopped.",
        504: "The request's deadline passed first.",
    }.items()
}


@router.get(
    "/models",
    operation_id="list_models",
    response_model=ModelList,
    responses={401: CHAT_ERRORS[401]},
    summary="The model served",
)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[served_model(request)])


@router.post(
    "/chat/completions",
    operation_id="create_chat_completion",
    response_model=ChatCompletion,
    responses={
        **CHAT_ERRORS,
        200: {
            "content": {EVENTS: {"schema": {"type": "string"}}},
            "description": "The answer; with stream, chunks.",
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}
            },
        }
    },
    summary="Answer a conversation, about images or text alone (OpenAI-compatible)",
)
async def create_chat_completion(
    request: Request,
    x_request_timeout: Annotated[float | None, Header(alias="X-Request-Timeout", ge=1, le=86_400)] = None,
) -> Response:
    arrived = time.monotonic()
    # Before anything else: a text/plain body is what a page on another site can send without asking.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the request as application/json")
    running = get_running(request)
    running.engine.check_admission()
    async with deadline(request, x_request_timeout) as deadline_s:
        with running.service.uploads.take():
            document = await read_json_object(request, upload_limits(running.service.settings))
        settings = running.service.settings
        chat = parse_request(document, settings.max_messages)
        running.text_fence.check(message_texts(chat))
        model = served_model(request)
        if chat.model != model.id:
            raise ApiError(
                404,
                "model_not_found",
                f"the model {chat.model[:QUOTED_CHARS]!r} is not served here; see /v1/models",
            )
        images, turns = conversation_parts(chat, settings.max_images)
        stops = stop_sequences(chat)
        submitted = await submit(
            request,
            arrived=arrived,
            options=GenerationOptions(requested_tokens(chat, settings.chat_max_new_tokens), group=GROUP),
            # max_tokens is an upper bound, as OpenAI's clients treat it: lowered to what the context holds.
            bounded=True,
            uploads=[ImageUpload(image) for image in images],
            queries=lambda decoded, order: [Query(with_pictures(turns, decoded), tuple(order))],
            deadline_s=deadline_s,
            deltas=True,
        )
        answer = Answer(submitted, stops)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return event_stream(chunks(answer, model.id, include_usage), submitted)
        text, reason = await cancel_on_disconnect(request, answer.whole())
    completion = ChatCompletion(
        id=answer.id,
        created=answer.created,
        model=model.id,
        choices=[Choice(message=ChatMessage(content=text), finish_reason=reason)],
        usage=answer.usage(),
    )
    return JSONResponse(completion.model_dump(mode="json"))


def served_model(request: Request) -> ModelCard:
    description = get_running(request).runtime.description
    return ModelCard(id=description.model, created=0, owned_by="medmo-serve")


def parse_request(document: dict[str, Any], max_messages: int) -> ChatCompletionRequest:
    """The request, typed as strictly as the task routes' JSON ("max_tokens": "5" is not 5, as OpenAI's own
    server has it); what it names but cannot honour, refused naming at most a short prefix of it."""
    messages = document.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:  # before validating each of them
        raise ApiError(
            400, "invalid_request", f"messages: at most {max_messages} on this server (MEDMO_MAX_MESSAGES)"
        )
    try:
        chat = ChatCompletionRequest.model_validate(document, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first["loc"])[:QUOTED_CHARS]
        if first["type"] == "extra_forbidden":
            raise ApiError(
                400, "unsupported_parameter", f"{location}: not supported by this service"
            ) from None
        raise ApiError(400, "invalid_request", f"{location}: {first['msg']}") from None
    if chat.stream_options is not None and not chat.stream:
        raise ApiError(400, "invalid_request", "stream_options: only with stream")
    for name, neutral in NEUTRAL.items():
        if getattr(chat, name) not in neutral:
            raise ApiError(
                400,
                "unsupported_parameter",
                f"{name}: only {neutral[1]!r} is supported: this service decodes greedily, one answer per request",
            )
    return chat


def message_texts(chat: ChatCompletionRequest) -> list[tuple[str, str]]:
    """The conversation's texts, named where they stand, for the text fence (`Running.text_fence`)."""
    texts = []
    for number, message in enumerate(chat.messages):
        if isinstance(message.content, str):
            texts.append((f"messages.{number}.content", message.content))
            continue
        for index, part in enumerate(message.content):
            if isinstance(part, TextPart):
                texts.append((f"messages.{number}.content.{index}.text", part.text))
    return texts


ChatTurn = tuple[Role, list[str | int]]  # a role and its parts: texts, and the index of each image


def conversation_parts(chat: ChatCompletionRequest, max_images: int) -> tuple[list[bytes], list[ChatTurn]]:
    """The images' bytes in the order they come, and the turns with each image's index where it stands.
    Any number of images (none: a text-only conversation), in user messages only."""
    images: list[bytes] = []
    turns: list[ChatTurn] = []
    for message in chat.messages:
        role: Role = "system" if message.role == "developer" else message.role
        parts: list[str | int] = []
        for part in (
            [TextPart(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        ):
            if isinstance(part, TextPart):
                parts.append(part.text)
                continue
            if role != "user":
                raise ApiError(400, "invalid_request", "messages: images go in user messages")
            if len(images) == max_images:
                raise ApiError(
                    413,
                    "too_many_images",
                    f"messages: at most {max_images} images per request on this server (MEDMO_MAX_IMAGES)",
                )
            parts.append(len(images))
            images.append(image_bytes(part.image_url.url))
        turns.append((role, parts))
    return images, turns


def image_bytes(url: str) -> bytes:
    if not url.startswith("data:"):
        raise ApiError(
            400,
            "image_url_not_supported",
            "image_url: send the image itself as a data: URI (data:image/png;base64,...): this service never "
            "fetches URLs",
        )
    return decode_base64_image(url)


def with_pictures(turns: list[ChatTurn], images: list[DecodedImage]) -> Conversation:
    return Conversation(
        tuple(
            Turn(role, tuple(images[part].picture if isinstance(part, int) else part for part in parts))
            for role, parts in turns
        )
    )


def requested_tokens(chat: ChatCompletionRequest, limit: int) -> int:
    """max_tokens (or max_completion_tokens) as the most to generate, within the server's chat limit."""
    requested = chat.max_completion_tokens or chat.max_tokens
    return limit if requested is None else min(requested, limit)


def stop_sequences(chat: ChatCompletionRequest) -> list[str]:
    """Up to 4 sequences (OpenAI's bound) of up to 64 characters each: the stop check runs on the event loop
    for every piece of text written, so its cost must stay small whatever a client sends."""
    stops = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES or not all(0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
        raise ApiError(
            400,
            "invalid_request",
            f"stop: up to {MAX_STOP_SEQUENCES} sequences of 1 to {MAX_STOP_CHARS} characters",
        )
    return stops


class Answer:
    """The text of a submitted chat request as it is written, ended early at a stop sequence.

    Text that could be the start of a stop sequence is held back until the next text settles it, so a
    stop sequence is never sent, even in part.
    """

    def __init__(self, submitted: Submitted, stops: list[str]) -> None:
        self.submitted = submitted
        self.stops = stops
        self.text = TextStream(submitted, submitted.first, GROUP)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.finish_reason: Literal["stop", "length"] = "length"
        self.completed: Completed | None = None

    async def pieces(self) -> AsyncIterator[str]:
        pending = ""
        try:
            async for delta in self.text.deltas():
                pending += delta
                cut = self._stop_at(pending)
                if cut is not None:
                    if pending[:cut]:
                        yield pending[:cut]
                    self.finish_reason = "stop"
                    self.submitted.ended_early(self.text.tokens, GROUP)
                    return
                keep = self._undecided_tail(pending)
                if len(pending) > keep:
                    yield pending[: len(pending) - keep]
                    pending = pending[len(pending) - keep :]
            if pending:
                yield pending
            self.completed = self.text.completed
            if self.completed is not None:
                self.finish_reason = self.completed.generation.finish_reason
                self.submitted.finished([self.completed], GROUP)
        finally:
            await self.submitted.aclose()  # a stop sequence ends the generation, too

    async def whole(self) -> tuple[str, Literal["stop", "length"]]:
        text = "".join([piece async for piece in self.pieces()])
        return text, self.finish_reason

    def usage(self) -> CompletionUsage:
        prompt = self.submitted.first.prepared.prompt_tokens
        written = self.text.tokens
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=written, total_tokens=prompt + written)

    def _stop_at(self, text: str) -> int | None:
        found = [text.find(stop) for stop in self.stops if stop in text]
        return min(found) if found else None

    def _undecided_tail(self, text: str) -> int:
        """How many characters at the end could begin a stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if stop.startswith(text[-size:]):
                    longest = max(longest, size)
                    break
        return longest


async def chunks(answer: Answer, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's chat.completion.chunk events, then [DONE]; a failure ends the stream in its error shape."""

    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {
            "id": answer.id,
            "object": "chat.completion.chunk",
            "created": answer.created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    try:
        yield sse(None, chunk({"role": "assistant", "content": ""}, None))
        async for piece in answer.pieces():
            yield sse(None, chunk({"content": piece}, None))
        yield sse(None, chunk({}, answer.finish_reason))
        if include_usage:
            usage = {**chunk({}, None), "choices": [], "usage": answer.usage().model_dump()}
            yield sse(None, usage)
    except Exception as exc:
        failure: Failure = classify(exc)
        answer.submitted.record.status = failure.status
        yield sse(None, openai_error(failure))
    yield sse(None, "[DONE]")
