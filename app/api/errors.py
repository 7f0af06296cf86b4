"""One error shape for every failure, and the one place that maps exceptions to HTTP statuses.

Every error body is {"error": {"code", "message", "request_id"}}, except on the OpenAI-compatible routes
(/v1/...), which answer in OpenAI's shape because that is what its SDKs read. Messages are written for
clients and never carry stack traces, object addresses, request content or patient data; details go to the
log by type only.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.grammar import ConstraintError
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
from app.pacs.dicomweb import PacsError, PacsNotConfiguredError, PacsNotFoundError, PacsTimeoutError
from app.schemas import ErrorResponse
from app.text.fence import TextRefusedError

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
    (TextRefusedError, 422, "invalid_text"),
    (ConstraintError, 422, "invalid_constraint"),
    (ContextTooLongError, 422, "context_too_long"),
    (QueueFullError, 429, "overloaded"),
    (NotAcceptingError, 503, "unavailable"),
    (WorkerDiedError, 503, "unavailable"),
    (DeadlineExceededError, 504, "timeout"),
    (TimeoutError, 504, "timeout"),
    (BatchFailedError, 500, "inference_failed"),
    # The PACS, over DICOMweb: the client named an image it does not have, or the PACS failed.
    (PacsNotFoundError, 404, "not_found"),
    (PacsTimeoutError, 504, "pacs_timeout"),
    (PacsNotConfiguredError, 503, "dicomweb_not_configured"),
    (PacsError, 502, "pacs_error"),
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


@dataclass(frozen=True)
class Failure:
    """What went wrong, as a client is told it."""

    status: int
    code: str
    message: str
    headers: dict[str, str] | None = None

    def body(self, request_id: str | None) -> dict[str, Any]:
        detail = {"code": self.code, "message": self.message, "request_id": request_id}
        return ErrorResponse.model_validate({"error": detail}).model_dump()


def classify(exc: Exception) -> Failure:
    """Map any exception to what the client is told. Unknown exceptions are a 500 with a generic message."""
    if isinstance(exc, ApiError):
        return Failure(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, RequestValidationError):
        return Failure(422, "invalid_request", describe_validation_errors(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return Failure(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    for exc_type, status, code in _STATUS_BY_TYPE:
        if isinstance(exc, exc_type):
            headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFullError) else None
            if status >= 500:
                logger.warning("request failed: %s (%s)", code, type(exc).__name__)
            return Failure(status, code, str(exc) or _DEFAULT_MESSAGES.get(code, code), headers)
    # The traceback's frames, not its message: exception messages can quote request content.
    logger.error("unhandled %s while serving a request\n%s", type(exc).__name__, _frames(exc))
    return Failure(500, "internal_error", "the server failed to process the request")


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return failure_response(request, Failure(status, code, message, headers))


def failure_response(request: Request, failure: Failure) -> JSONResponse:
    """The failure in the error shape of the API the request called: this service's, or OpenAI's on /v1."""
    if request.url.path.startswith(OPENAI_PREFIX):
        body = openai_error(failure)
    else:
        body = failure.body(request_id_of(request))
    return JSONResponse(body, status_code=failure.status, headers=failure.headers)


def to_error_response(request: Request, exc: Exception) -> JSONResponse:
    return failure_response(request, classify(exc))


OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_error(failure: Failure, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its SDKs read: {"error": {"message", "type", "param", "code"}}."""
    kind = _OPENAI_TYPES.get(
        failure.status, "server_error" if failure.status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": failure.message, "type": kind, "param": param, "code": failure.code}}


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
