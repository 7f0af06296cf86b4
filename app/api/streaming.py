"""Answers streamed as Server-Sent Events: text as the model writes it, then the result.

Everything that can refuse a request has happened before a stream opens; what fails after (the engine,
the deadline) ends the stream with an error event in the usual error shape. A client that goes away stops
the request's generation: Starlette cancels the stream, and closing it abandons the request in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from app.api.errors import Failure, classify
from app.api.negotiation import EVENTS
from app.api.pipeline import Generating, Submitted
from app.engine.detokenizer import Detokenizer
from app.engine.protocol import Completed, TokenDelta
from app.engine.request import TokenLogprobs

T = TypeVar("T")

# nginx's status for a client that closed the connection before the answer ended.
CLIENT_GONE = 499
# Proxies (nginx and others) buffer responses unless told not to; a buffered stream arrives all at once.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: str | None, data: Any) -> bytes:
    """One Server-Sent Event; `data` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


@dataclass
class WrittenToken:
    """A generated token, the text it adds to the answer, and its log-probabilities when they were asked for.

    The text is empty for a control token (the answer's text leaves them out) and for a token that ends
    inside a multi-byte character: the token that completes the character carries all of it.
    """

    token_id: int
    text: str
    logprobs: TokenLogprobs | None = None


class TextStream:
    """The text of one of a submitted request's queries as it is written, with the timings that the access
    log and metrics keep."""

    def __init__(self, submitted: Submitted, generating: Generating, route: str) -> None:
        self.submitted = submitted
        self.generating = generating
        self.route = route
        self.detokenizer = Detokenizer(submitted.running.runtime.decode)
        self.first_text_at: float | None = None
        self.completed: Completed | None = None
        self.tokens = 0  # generated so far

    async def deltas(self) -> AsyncIterator[str]:
        """New text as it comes; at the end, whatever the whole answer adds. Sets `completed`."""
        async for event in self.generating.events:
            if isinstance(event, TokenDelta):
                self.tokens += len(event.token_ids)
                text = self.detokenizer.push(event.token_ids)
            else:
                self.completed = event
                text = self.detokenizer.finish(event.generation.text)
            if text:
                if self.first_text_at is None:
                    self.first_text_at = time.monotonic()
                yield text
            if self.completed is not None:
                self.account(self.completed)
                return

    async def written(self) -> AsyncIterator[WrittenToken]:
        """The answer token by token as it comes, each with its text settled (a token whose character is
        incomplete waits for the token that completes it) and its log-probabilities when asked for (those
        the engine sends only with the result, as the generate engine does, wait for the result). Sets
        `completed`."""
        asked = self.generating.prepared.options.logprobs is not None
        unsettled: list[WrittenToken] = []
        handed_out = 0  # tokens yielded so far
        async for event in self.generating.events:
            if isinstance(event, TokenDelta):
                self.tokens += len(event.token_ids)
                for index, token in enumerate(event.token_ids):
                    text = self.detokenizer.push((token,))
                    logprobs = event.logprobs[index] if event.logprobs is not None else None
                    unsettled.append(WrittenToken(token, text, logprobs))
                    if text and self.first_text_at is None:
                        self.first_text_at = time.monotonic()
                if asked and event.logprobs is None:
                    continue
                settled = _after_last_text(unsettled)
            else:
                self.completed = event
                generation = event.generation
                rest = self.detokenizer.finish(generation.text)
                tail = _after_last_text(unsettled)
                if rest and tail < len(unsettled):  # a character the answer ended inside
                    unsettled[tail].text = rest
                if generation.logprobs is not None:
                    for number, waiting in enumerate(unsettled, start=handed_out):
                        if waiting.logprobs is None and number < len(generation.logprobs):
                            waiting.logprobs = generation.logprobs[number]
                settled = len(unsettled)
            for written in unsettled[:settled]:
                yield written
            handed_out += settled
            del unsettled[:settled]
            if self.completed is not None:
                self.account(self.completed)
                return

    def account(self, completed: Completed) -> None:
        submitted, metrics = self.submitted, self.submitted.running.service.metrics
        if self.first_text_at is None or submitted.record.time_to_first_token_ms is not None:
            return  # a request of several queries is timed by the first that writes
        first_token_s = self.first_text_at - submitted.arrived
        record = submitted.record
        record.time_to_first_token_ms = round(first_token_s * 1000, 3)
        metrics.stream_first_token.labels(route=self.route).observe(first_token_s)
        writing_s = time.monotonic() - self.first_text_at
        tokens = completed.generation.completion_tokens
        if tokens > 1 and writing_s > 0:
            rate = (tokens - 1) / writing_s
            record.tokens_per_s = round(rate, 1)
            metrics.stream_tokens_per_second.labels(route=self.route).observe(rate)


def event_stream(body: AsyncIterator[bytes], submitted: Submitted) -> StreamingResponse:
    # Closing the request's streams once the response is done also covers a response never iterated.
    return StreamingResponse(
        body,
        media_type=EVENTS,
        headers=STREAM_HEADERS,
        background=BackgroundTask(submitted.aclose),
    )


async def task_events(
    streams: list[TextStream], result: Callable[[list[Completed]], dict[str, Any]]
) -> AsyncIterator[bytes]:
    """`delta` events with new text, then one `result` event with the route's JSON response, or one `error`.

    A request of several queries (grounding several images) streams them side by side: each delta names
    the image its text is about (`image_index`).
    """
    submitted = streams[0].submitted
    ended = False
    try:
        if len(streams) == 1:
            async for text in streams[0].deltas():
                yield sse("delta", {"text": text})
        else:
            async for stream, text in side_by_side(streams):
                yield sse("delta", {"text": text, "image_index": stream.generating.query.images[0]})
        completed = [stream.completed for stream in streams]
        assert all(c is not None for c in completed)
        ended = True
        yield sse("result", result([c for c in completed if c is not None]))
    except Exception as exc:
        ended = True
        failure: Failure = classify(exc)
        submitted.record.status = failure.status  # the log says how it ended, not the 200 it began as
        yield sse("error", failure.body(submitted.record.request_id))
    finally:
        if not ended:
            abandoned(streams)
        await submitted.aclose()


def _after_last_text(tokens: Sequence[WrittenToken]) -> int:
    """How many of `tokens` are settled: up to the last that carries text (those after it may be the start
    of a character that is not complete yet)."""
    for index in range(len(tokens) - 1, -1, -1):
        if tokens[index].text:
            return index + 1
    return 0


def abandoned(streams: list[TextStream]) -> None:
    """A client that went away mid-answer: its access line says so (499, not the 200 the stream began as),
    and the tokens the model wrote for it count among those generated."""
    submitted = streams[0].submitted
    submitted.record.status = CLIENT_GONE
    submitted.ended_early(sum(stream.tokens for stream in streams), streams[0].route)


async def side_by_side(streams: list[TextStream]) -> AsyncIterator[tuple[TextStream, str]]:
    """Every stream's text as it comes, whichever writes first; the first failure ends them all."""

    async def texts(stream: TextStream) -> AsyncIterator[tuple[TextStream, str]]:
        async for text in stream.deltas():
            yield stream, text

    async for item in merged([texts(stream) for stream in streams]):
        yield item


async def merged(sources: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Every source's items as they come, whichever gives first; the first failure ends them all."""
    news: asyncio.Queue[T | BaseException | _Ended] = asyncio.Queue()

    async def read(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await news.put(item)
            await news.put(_ENDED)
        except Exception as exc:
            await news.put(exc)

    readers = [asyncio.create_task(read(source)) for source in sources]
    try:
        running = len(readers)
        while running:
            item = await news.get()
            if isinstance(item, _Ended):
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


class _Ended:
    """A source of `merged` has no more items."""


_ENDED = _Ended()
