"""How soon a request asks to be served: its `priority` field, else its X-Priority header, else routine.

The header is known before the body is read, so a full queue can refuse a routine upload at once; a
request whose priority is only in its body is first checked as if it were stat (it may be), and is held to
its own priority when it takes its place, once the body has arrived.
"""

from __future__ import annotations

from fastapi import Request

from app.api.errors import ApiError
from app.engine.request import Priority

HEADER = "X-Priority"


def header_priority(request: Request) -> Priority | None:
    value = request.headers.get(HEADER)
    if value is None:
        return None
    try:
        return Priority(value.strip().lower())
    except ValueError:
        raise ApiError(
            422, "invalid_request", f"{HEADER}: one of {', '.join(p.value for p in Priority)}"
        ) from None


def requested_priority(request: Request, field: Priority | None) -> Priority:
    """The request's priority: the body's field, else the header, else routine."""
    if field is not None:
        return field
    return header_priority(request) or Priority.ROUTINE


def early_priority(request: Request) -> Priority:
    """The priority to check the queue with before the body is read: the header's, else stat's."""
    return header_priority(request) or Priority.STAT
