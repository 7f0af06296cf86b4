"""Which representation a client asked for with its Accept header: JSON, a DICOM Structured Report, or the
answer streamed as Server-Sent Events."""

from __future__ import annotations

from typing import Literal

from app.api.errors import ApiError

DICOM = "application/dicom"
JSON = "application/json"
EVENTS = "text/event-stream"

Representation = Literal["json", "dicom", "events"]
_BY_MEDIA_TYPE: dict[str, Representation] = {JSON: "json", DICOM: "dicom", EVENTS: "events"}


def representation(accept: str | None) -> Representation:
    """The representation with the highest quality; 406 when the client accepts none.

    Wildcards (*/*, application/*) count for JSON, the default, a hair below an explicit type, so that
    "application/dicom, */*" asks for DICOM and a browser's or curl's "*/*" gets JSON.
    """
    if not accept or not accept.strip():
        return "json"
    quality: dict[Representation, float] = {"json": 0.0, "dicom": 0.0, "events": 0.0}
    for entry in accept.split(","):
        media, *parameters = (part.strip() for part in entry.split(";"))
        media = media.lower()
        weight = _quality(parameters)
        if media in _BY_MEDIA_TYPE:
            chosen = _BY_MEDIA_TYPE[media]
            quality[chosen] = max(quality[chosen], weight)
        elif media in ("*/*", "application/*"):
            quality["json"] = max(quality["json"], weight - 0.0001)
    best = max(quality, key=lambda kind: (quality[kind], kind == "json"))
    if quality[best] <= 0:
        raise ApiError(
            406,
            "not_acceptable",
            f"responses are {JSON}, {EVENTS} (the answer as it is written), or {DICOM} (a Structured Report)",
        )
    return best


def _quality(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(1.0, max(0.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0
