"""Answers streamed as Server-Sent Events: text as the model writes it, then the result.

Everything that can refuse a request has happened before a stream opens; what fails after (the engine,
the deadline) ends the stream with an error event in the usual error shape. A client that goes away stops
the request's generation: Starlette cancels the stream, and closing it abandons the request in the engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from app.api.errors import Failure, classify
from app.api.negotiation import EVENTS
from app.api.pipeline import Submitted
from app.engine.detokenizer import Detokenizer
from app.engine.protocol import Completed, TokenDelta

# Proxies (nginx and others) buffer responses unless told not to; a buffered stream arrives all at once.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: str | None, data: Any) -> bytes:
    """One Server-Sent Event; `data` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class TextStream:
    """A submitted request's text as it is written, with the timings that the access log and metrics keep."""

    def __init__(self, submitted: Submitted, route: str) -> None:
        self.submitted = submitted
        self.route = route
        self.detokenizer = Detokenizer(submitted.running.runtime.decode)
        self.first_text_at: float | None = None
        self.completed: Completed | None = None
        self.tokens = 0  # generated so far

    async def deltas(self) -> AsyncIterator[str]:
        """New text as it comes; at the end, whatever the whole answer adds. Sets `completed`."""
        async for event in self.submitted.events:
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

    def account(self, completed: Completed) -> None:
        submitted, metrics = self.submitted, self.submitted.running.service.metrics
        if self.first_text_at is None:
            return
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
    # Closing the request's stream once the response is done also covers a response never iterated.
    return StreamingResponse(
        body,
        media_type=EVENTS,
        headers=STREAM_HEADERS,
        background=BackgroundTask(submitted.events.aclose),
    )


async def task_events(
    stream: TextStream, result: Callable[[Completed], dict[str, Any]]
) -> AsyncIterator[bytes]:
    """`delta` events with new text, then one `result` event with the route's JSON response, or one `error`."""
    try:
        async for text in stream.deltas():
            yield sse("delta", {"text": text})
        assert stream.completed is not None
        yield sse("result", result(stream.completed))
    except Exception as exc:
        failure: Failure = classify(exc)
        stream.submitted.record.status = failure.status  # the log says how it ended, not the 200 it began as
        yield sse("error", failure.body(stream.submitted.record.request_id))
    finally:
        await stream.submitted.events.aclose()
