"""OpenAI-compatible chat: POST /v1/chat/completions and GET /v1/models.

The protocol the largest ecosystem of vision-language clients speaks (the `openai` SDKs, LangChain, chat
front-ends, evaluation harnesses), for what MedMO can do: a conversation (system messages, earlier
assistant turns) holding any number of images up to MEDMO_MAX_IMAGES, or none, each a `data:` URI
(base64 PNG, JPEG or DICOM; the service never fetches a URL), answered whole or streamed in OpenAI's
chunk format. Decoding is greedy unless a temperature is given (then sampled, seeded, with top_p, top_k
and a repetition penalty); n answers share one reading of the prompt; logprobs reports each token's
log-probability; response_format holds the answer to a JSON schema as it is written. max_tokens is an
upper bound: a request asking for more than the context holds after its prompt is served up to what fits,
ending with finish_reason "length". A parameter MedMO cannot honour is refused in OpenAI's error shape,
never ignored. The same keys (Bearer), admission, limits and deadlines apply as on the task routes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api.auth import require_api_key
from app.api.chat_models import (
    MAX_CHOICES,
    NEUTRAL,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    CompletionUsage,
    JsonObjectFormat,
    JsonSchemaFormat,
    ModelCard,
    ModelList,
    OpenAIError,
    TextPart,
    TokenLogprob,
    TopLogprob,
)
from app.api.deps import Running, get_running
from app.api.errors import ApiError, Failure, classify, openai_error
from app.api.middleware import request_record
from app.api.negotiation import EVENTS
from app.api.pipeline import (
    Generating,
    ImageUpload,
    Submitted,
    cancel_on_disconnect,
    deadline,
    in_pool,
    submit,
    upload_limits,
)
from app.api.priority import early_priority, requested_priority
from app.api.streaming import TextStream, WrittenToken, event_stream, merged, sse
from app.api.uploads import decode_base64_image, read_json_object
from app.conversation import Conversation, Query, Role, Turn
from app.engine.grammar import Constraint, ConstraintError
from app.engine.request import FinishReason, GenerationOptions, Priority, Sampling
from app.imaging import DecodedImage
from app.settings import Settings
from app.text.fence import QUOTED_CHARS

GROUP = "chat"
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
# Seeds as the engines hold them (signed 64-bit), with room for the seed + k of each further choice.
SEED_SPACE = 2**63 - MAX_CHOICES
# OpenAI's log-probability for a token too unlikely to hold (and never -inf, which JSON cannot carry).
VERY_UNLIKELY = -9999.0


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
    running.engine.check_admission(early_priority(request))
    async with deadline(request, x_request_timeout) as deadline_s:
        with running.service.uploads.take():
            document = await read_json_object(request, upload_limits(running.service.settings))
        settings = running.service.settings
        chat = parse_request(document, settings)
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
        constraint = await answer_constraint(chat, running)
        submitted = await submit(
            request,
            arrived=arrived,
            options=generation_options(
                chat, settings.chat_max_new_tokens, requested_priority(request, chat.priority)
            ),
            # max_tokens is an upper bound, as OpenAI's clients treat it: lowered to what the context holds.
            bounded=True,
            uploads=[ImageUpload(image) for image in images],
            queries=lambda decoded, order: [
                Query(
                    with_pictures(turns, decoded),
                    tuple(order),
                    answer_shape=None if constraint is None else lambda _sizes: constraint,
                )
            ],
            deadline_s=deadline_s,
            deltas=True,
            choices=chat.n or 1,
        )
        spelling = Spelling(running.runtime.processor.tokenizer) if chat.logprobs else None
        answer = Answer(submitted, stops, spelling)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return event_stream(chunks(answer, model.id, include_usage), submitted)
        written = await cancel_on_disconnect(request, answer.whole())
    completion = ChatCompletion(
        id=answer.id,
        created=answer.created,
        model=model.id,
        choices=[
            Choice(
                index=index,
                message=ChatMessage(content=text),
                finish_reason=reason,
                logprobs=None if spelling is None else ChoiceLogprobs(content=logprobs),
            )
            for index, (text, reason, logprobs) in enumerate(written)
        ],
        usage=answer.usage(),
    )
    return JSONResponse(completion.model_dump(mode="json"))


def served_model(request: Request) -> ModelCard:
    description = get_running(request).runtime.description
    return ModelCard(id=description.model, created=0, owned_by="medmo-serve")


def parse_request(document: dict[str, Any], settings: Settings) -> ChatCompletionRequest:
    """The request, typed as strictly as the task routes' JSON ("max_tokens": "5" is not 5, as OpenAI's own
    server has it); what it names but cannot honour, refused naming at most a short prefix of it."""
    max_messages = settings.max_messages
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
    if chat.top_logprobs is not None and not chat.logprobs:
        raise ApiError(400, "invalid_request", "top_logprobs: only with logprobs true")
    if chat.n is not None and chat.n > settings.most_choices:
        raise ApiError(
            400,
            "invalid_request",
            f"n: at most {settings.most_choices} on this server (MEDMO_MAX_N, within MEDMO_MAX_QUEUE)",
        )
    for name, neutral in NEUTRAL.items():
        if getattr(chat, name) not in neutral:
            raise ApiError(
                400,
                "unsupported_parameter",
                f"{name}: only {neutral[1]!r} is supported; repetition_penalty is the penalty this service applies",
            )
    return chat


def generation_options(chat: ChatCompletionRequest, limit: int, priority: Priority) -> GenerationOptions:
    """How the answers are written: greedily unless a temperature above 0 asks for sampling, which is seeded
    (by the client, or by a seed drawn here)."""
    temperature = chat.temperature or 0.0
    seed = 0
    if temperature > 0:
        seed = (secrets.randbits(63) if chat.seed is None else chat.seed) % SEED_SPACE
    sampling = Sampling(
        temperature=temperature,
        top_p=1.0 if chat.top_p is None else chat.top_p,
        top_k=chat.top_k or 0,
        repetition_penalty=1.0 if chat.repetition_penalty is None else chat.repetition_penalty,
        seed=seed,
    )
    return GenerationOptions(
        requested_tokens(chat, limit),
        group=GROUP,
        sampling=sampling,
        logprobs=(chat.top_logprobs or 0) if chat.logprobs else None,
        priority=priority,
    )


async def answer_constraint(chat: ChatCompletionRequest, running: Running) -> Constraint | None:
    """The language response_format holds the answer to, compiled now (once while cached), so that a schema
    the grammar library refuses is a 400 before the request takes a place in the queue."""
    response_format = chat.response_format
    try:
        if isinstance(response_format, JsonSchemaFormat):
            schema = response_format.json_schema.schema_
            constraint = Constraint.json_schema({} if schema is None else schema)
        elif isinstance(response_format, JsonObjectFormat):
            constraint = Constraint.json_object()
        else:
            return None
        await in_pool(running.prepare_pool, partial(running.runtime.grammars.compile, constraint))
    except ConstraintError as error:
        raise ApiError(400, "invalid_request", f"response_format: {error}") from None
    return constraint


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


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, which Qwen's tokenizer shares: the byte each character of a token stands
    for. Printable bytes stand for themselves; the others, in order, for the characters from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), 256),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + n): byte for n, byte in enumerate(others)}


BYTE_OF_CHARACTER = byte_level_alphabet()


class Spelling:
    """How a client is shown a token: its text and its UTF-8 bytes, read from the tokenizer's vocabulary.

    A byte-level BPE token's characters each stand for a byte (GPT-2's alphabet, which Qwen's shares), and
    its bytes may be part of a character that only the next token completes: its text then shows U+FFFD
    where its bytes do not make a character. An added token is its own text; a control token (special)
    shows its name, and has no bytes, as the answer's text leaves it out.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._added = dict(tokenizer.added_tokens_decoder)
        self._known: dict[int, tuple[str, list[int] | None]] = {}

    def token(self, written: WrittenToken) -> TokenLogprob:
        """A generated token with its log-probability and the most likely tokens beside it."""
        assert written.logprobs is not None
        text, raw = self.spelled(written.token_id)
        # Built without validation: thousands per answer, of values typed here.
        return TokenLogprob.model_construct(
            token=text,
            logprob=max(VERY_UNLIKELY, written.logprobs.logprob),
            bytes=raw,
            top_logprobs=[
                TopLogprob.model_construct(
                    token=other[0], logprob=max(VERY_UNLIKELY, logprob), bytes=other[1]
                )
                for other, logprob in ((self.spelled(index), value) for index, value in written.logprobs.top)
            ],
        )

    def spelled(self, token_id: int) -> tuple[str, list[int] | None]:
        known = self._known.get(token_id)
        if known is None:
            known = self._known[token_id] = self._spell(token_id)
        return known

    def _spell(self, token_id: int) -> tuple[str, list[int] | None]:
        added = self._added.get(token_id)
        if added is not None:
            return str(added.content), None if added.special else list(added.content.encode())
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # a row of the model's logits past the tokenizer's vocabulary
            return "", None
        if all(char in BYTE_OF_CHARACTER for char in piece):
            raw = bytes(BYTE_OF_CHARACTER[char] for char in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = str(self._tokenizer.decode([token_id]))  # a tokenizer that is not byte-level
        return text, list(text.encode())


@dataclass(frozen=True)
class Piece:
    """Text of an answer to send, and the log-probabilities of the tokens it starts (when asked for)."""

    text: str
    logprobs: list[TokenLogprob]


Written = tuple[str, FinishReason, list[TokenLogprob]]  # an answer whole: text, finish_reason, logprobs


class ChoiceStream:
    """One answer (choice) of a chat request as it is written, ended early at a stop sequence.

    Text that could be the start of a stop sequence is held back until the next text settles it, so a
    stop sequence is never sent, even in part. A token's log-probabilities go with the first text sent
    after its start: the token a stop sequence begins in is kept, the tokens after it are not, and neither
    is the end of the turn.
    """

    def __init__(
        self, submitted: Submitted, generating: Generating, stops: list[str], spelling: Spelling | None
    ) -> None:
        self.text = TextStream(submitted, generating, GROUP)
        self.stops = stops
        self.spelling = spelling
        self.eos = submitted.running.runtime.eos_token_ids
        self.finish_reason: FinishReason = "length"

    async def pieces(self) -> AsyncIterator[Piece]:
        pending = ""  # written, not sent: it may begin a stop sequence
        sent = 0  # characters sent
        waiting: list[tuple[int, TokenLogprob]] = []  # unsent tokens' log-probabilities, by where they start

        def starting_before(position: int) -> list[TokenLogprob]:
            count = sum(1 for start, _ in waiting if start < position)
            due = [token for _, token in waiting[:count]]
            del waiting[:count]
            return due

        try:
            async for token in self.text.written():
                if (
                    self.spelling is not None
                    and token.logprobs is not None
                    and token.token_id not in self.eos
                ):
                    waiting.append((sent + len(pending), self.spelling.token(token)))
                if not token.text:
                    continue
                pending += token.text
                cut = self._stop_at(pending)
                if cut is not None:
                    yield Piece(pending[:cut], starting_before(sent + cut))
                    self.finish_reason = "stop"
                    self.text.submitted.ended_early(self.text.tokens, GROUP)
                    return
                keep = self._undecided_tail(pending)
                if len(pending) > keep:
                    sent += len(pending) - keep
                    yield Piece(pending[: len(pending) - keep], starting_before(sent))
                    pending = pending[len(pending) - keep :]
            if pending or waiting:
                yield Piece(pending, [token for _, token in waiting])
            if self.text.completed is not None:
                self.finish_reason = self.text.completed.generation.finish_reason
        finally:
            await self.text.generating.events.aclose()  # a stop sequence ends the generation, too

    async def whole(self) -> Written:
        text, logprobs = [], []
        async for piece in self.pieces():
            text.append(piece.text)
            logprobs += piece.logprobs
        return "".join(text), self.finish_reason, logprobs

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


class Answer:
    """The n answers (choices) of a submitted chat request, one per sequence it was submitted as."""

    def __init__(self, submitted: Submitted, stops: list[str], spelling: Spelling | None) -> None:
        self.submitted = submitted
        self.choices = [
            ChoiceStream(submitted, generating, stops, spelling) for generating in submitted.queries
        ]
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def whole(self) -> list[Written]:
        try:
            written = list(await asyncio.gather(*(choice.whole() for choice in self.choices)))
        finally:
            await self.submitted.aclose()
        self.finished()
        return written

    def finished(self) -> None:
        """Account for the answers the model ended (those a stop sequence ended are counted as they end)."""
        completed = [choice.text.completed for choice in self.choices if choice.text.completed is not None]
        if completed:
            self.submitted.finished(completed, GROUP)

    def usage(self) -> CompletionUsage:
        prompt = self.submitted.first.prepared.prompt_tokens
        written = sum(choice.text.tokens for choice in self.choices)
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=written, total_tokens=prompt + written)


async def chunks(answer: Answer, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's chat.completion.chunk events, then [DONE]; a failure ends the stream in its error shape.

    The n choices are written side by side, each chunk naming its choice's index; each choice ends with a
    chunk of its finish_reason.
    """

    def chunk(
        index: int, delta: dict[str, str], finish: str | None, logprobs: list[TokenLogprob] | None = None
    ) -> dict[str, Any]:
        return {
            "id": answer.id,
            "object": "chat.completion.chunk",
            "created": answer.created,
            "model": model,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": None if logprobs is None else ChoiceLogprobs(content=logprobs).model_dump(),
                }
            ],
        }

    async def choice_chunks(index: int, choice: ChoiceStream) -> AsyncIterator[dict[str, Any]]:
        yield chunk(index, {"role": "assistant", "content": ""}, None)
        async for piece in choice.pieces():
            yield chunk(index, {"content": piece.text}, None, piece.logprobs if choice.spelling else None)
        yield chunk(index, {}, choice.finish_reason)

    try:
        async for event in merged(
            [choice_chunks(index, choice) for index, choice in enumerate(answer.choices)]
        ):
            yield sse(None, event)
        answer.finished()
        if include_usage:
            usage = {**chunk(0, {}, None), "choices": [], "usage": answer.usage().model_dump()}
            yield sse(None, usage)
    except Exception as exc:
        failure: Failure = classify(exc)
        answer.submitted.record.status = failure.status
        yield sse(None, openai_error(failure))
    yield sse(None, "[DONE]")
