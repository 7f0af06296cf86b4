"""Per-request context: the request id, and the one access-log line and metrics written when it ends.

The access log line carries only what operations need (ids, task, status, timings, sizes, format). Never
question text, generated text, image bytes, DICOM patient data or keys: the record has no field for them.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass

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


def request_record(request: Request) -> RequestRecord:
    record = request.state.record
    assert isinstance(record, RequestRecord)
    return record


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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

        try:
            await self.app(scope, receive, send_with_id)
        finally:
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
