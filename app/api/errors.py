"""One error shape for every failure, and the one place that maps exceptions to HTTP statuses.

Every error body is {"error": {"code", "message", "request_id"}}. Messages are written for clients and never
carry stack traces, object addresses, request content or patient data; details go to the log by type only.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.protocol import (
    BatchFailedError,
    ContextTooLongError,
    DeadlineExceededError,
    NotAcceptingError,
    QueueFullError,
    WorkerDiedError,
)
from app.imaging import (
    ImageError,
    ImageTooLargeError,
    UnreadableImageError,
    UnsupportedImageError,
    UnusableImageError,
)
from app.outputs.dicom_sr import ReportSourceError
from app.schemas import ErrorResponse

logger = logging.getLogger("medmo.api")


class ApiError(Exception):
    """An error raised by the HTTP layer itself, with its status and code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# Exception type -> (status, code). The first matching entry wins, so subclasses come first.
_STATUS_BY_TYPE: list[tuple[type[Exception], int, str]] = [
    (UnreadableImageError, 400, "unreadable_image"),
    (ImageTooLargeError, 413, "image_too_large"),
    (UnsupportedImageError, 415, "unsupported_image"),
    (UnusableImageError, 422, "unusable_image"),
    (ImageError, 400, "bad_image"),
    (ReportSourceError, 422, "incomplete_report_source"),
    (ContextTooLongError, 422, "context_too_long"),
    (QueueFullError, 429, "overloaded"),
    (NotAcceptingError, 503, "unavailable"),
    (WorkerDiedError, 503, "unavailable"),
    (DeadlineExceededError, 504, "timeout"),
    (TimeoutError, 504, "timeout"),
    (BatchFailedError, 500, "inference_failed"),
]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    503: "unavailable",
}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse.model_validate(
        {"error": {"code": code, "message": message, "request_id": request_id_of(request)}}
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def to_error_response(request: Request, exc: Exception) -> JSONResponse:
    """Map any exception to the error shape. Unknown exceptions are a 500 with a generic message."""
    if isinstance(exc, ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, RequestValidationError):
        return error_response(request, 422, "invalid_request", describe_validation_errors(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    for exc_type, status, code in _STATUS_BY_TYPE:
        if isinstance(exc, exc_type):
            headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFullError) else None
            if status >= 500:
                logger.warning("request failed: %s (%s)", code, type(exc).__name__)
            message = str(exc) or _DEFAULT_MESSAGES.get(code, code)
            return error_response(request, status, code, message, headers)
    # The traceback's frames, not its message: exception messages can quote request content.
    logger.error("unhandled %s while serving a request\n%s", type(exc).__name__, _frames(exc))
    return error_response(request, 500, "internal_error", "the server failed to process the request")


_DEFAULT_MESSAGES = {
    "timeout": "the request did not complete within its deadline",
}


def describe_validation_errors(errors: Any) -> str:
    """'question: Field required; target: String should have at most 500 characters' (no input echoed)."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{location}: {error.get('msg', 'invalid')}" if location else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def _frames(exc: Exception) -> str:
    return "".join(traceback.format_tb(exc.__traceback__)).rstrip()


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return to_error_response(request, exc)

    app.add_exception_handler(ApiError, handle)
    app.add_exception_handler(RequestValidationError, handle)
    app.add_exception_handler(StarletteHTTPException, handle)
    app.add_exception_handler(Exception, handle)
    for exc_type, _, _ in _STATUS_BY_TYPE:
        app.add_exception_handler(exc_type, handle)
