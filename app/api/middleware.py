"""Per-request context: the request id, the one access-log line and metrics written when it ends, and the
register of accepted requests that a shutdown drains.

The access log line carries only what operations need (ids, task, status, timings, sizes, format). Never
question text, generated text, image bytes, DICOM patient data or keys: the record has no field for them.

A request is accepted when it arrives, whatever it goes on to do: read an upload, fetch from the PACS,
decode a preview, wait in the queue, run in the engine, build a report, stream its answer. On SIGTERM
the service stops accepting (new requests get 503 in the error shape; the probes and /metrics still
answer) and waits for every accepted request to end, up to MEDMO_SHUTDOWN_GRACE_S. Those still running
then are cut short, and answer 503 in the error shape if they have not begun answering: never the
plain-text 500 a server cancelling its requests would send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

access_log = logging.getLogger("medmo.access")

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    status: int = 0
    task: str | None = None
    latency_ms: float = 0.0
    queue_ms: float | None = None
    batch_size: int | None = None
    images: int | None = None  # how many the request held; the first one's size, format and modality follow
    image_width: int | None = None
    image_height: int | None = None
    image_format: str | None = None
    modality: str | None = None
    time_to_first_token_ms: float | None = None  # streamed answers: from arrival to the first text sent
    tokens_per_s: float | None = None  # streamed answers: how fast the text was written after that


# Answered during a drain, and not waited for: cheap, and what orchestrators and operators watch it with.
UNDRAINED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class Accepted:
    """The requests accepted and not yet ended, for a drain to wait for (on the event loop's thread)."""

    def __init__(self) -> None:
        self.closed = False  # a drain began: new requests are refused
        self.cutting = False  # the grace ran out: the requests still running are being cut short
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def drain(self, grace_s: float) -> bool:
        """Stop accepting; wait for the accepted requests, or cut them short when `grace_s` runs out.
        False if some had to be cut."""
        self.closed = True
        if await self._idle_within(grace_s):
            return True
        self.cutting = True
        for task in list(self._tasks):
            task.cancel()
        await self._idle_within(CUT_SHORT_S)
        return False

    async def _idle_within(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


# How long requests cut short at the end of a drain have to send their 503.
CUT_SHORT_S = 2.0


def request_record(request: Request) -> RequestRecord:
    record = request.state.record
    assert isinstance(record, RequestRecord)
    return record


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, accepted: Accepted) -> None:
        self.app = app
        self.metrics = metrics
        self.accepted = accepted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = _request_id(scope)
        record = RequestRecord(request_id=request_id, method=scope["method"], path="unmatched")
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["record"] = record

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        drained = scope["path"] not in UNDRAINED_PATHS
        task = asyncio.current_task()
        try:
            if drained and self.accepted.closed:
                await shutting_down(send_with_id, request_id)
                return
            if drained and task is not None:
                self.accepted.enter(task)
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if not (self.accepted.cutting and record.status == 0):
                raise
            # Cut short at the end of a drain, before it began answering: it says so, in the error shape.
            await shutting_down(send_with_id, request_id)
        finally:
            if task is not None:
                self.accepted.leave(task)
            record.latency_ms = round((time.monotonic() - started) * 1000, 3)
            # The route's template, never the raw path: a client can put anything in a URL.
            record.path = getattr(scope.get("route"), "path", record.path)
            if (
                record.status == 0
            ):  # the app raised before answering; Starlette's error middleware answers 500
                record.status = 500
            if record.task is not None:
                self.metrics.requests.labels(task=record.task, status=str(record.status)).inc()
            access_log.info("request", extra={"fields": _loggable(record)})


async def shutting_down(send: Send, request_id: str) -> None:
    body = json.dumps(
        {"error": {"code": "unavailable", "message": "the server is shutting down", "request_id": request_id}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = bytes(value).decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _loggable(record: RequestRecord) -> dict[str, object]:
    return {key: value for key, value in asdict(record).items() if value is not None}
