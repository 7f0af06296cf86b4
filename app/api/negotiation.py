"""Which representation a client asked for with its Accept header: JSON, the answer streamed as
Server-Sent Events, a DICOM Structured Report or Presentation State, or the image with the findings drawn."""

from __future__ import annotations

from typing import Literal

from app.api.errors import ApiError

DICOM = "application/dicom"
JSON = "application/json"
EVENTS = "text/event-stream"
PNG = "image/png"
JPEG = "image/jpeg"
# The DICOM object wanted is a media-type parameter: application/dicom; object=gsps.
GSPS_PARAMETER = ("object", "gsps")

Representation = Literal["json", "events", "dicom", "gsps", "png", "jpeg"]
_BY_MEDIA_TYPE: dict[str, Representation] = {
    JSON: "json",
    EVENTS: "events",
    DICOM: "dicom",
    PNG: "png",
    JPEG: "jpeg",
}
IMAGES: dict[Representation, str] = {"png": PNG, "jpeg": JPEG}


def representation(accept: str | None) -> Representation:
    """The representation with the highest quality; 406 when the client accepts none.

    Wildcards (*/*, application/*) count for JSON, the default, a hair below an explicit type, so that
    "application/dicom, */*" asks for DICOM and a browser's or curl's "*/*" gets JSON.
    """
    if not accept or not accept.strip():
        return "json"
    quality: dict[Representation, float] = {}
    for entry in accept.split(","):
        media, *parameters = (part.strip() for part in entry.split(";"))
        media = media.lower()
        weight = _quality(parameters)
        chosen: Representation | None = None
        if media in _BY_MEDIA_TYPE:
            chosen = _BY_MEDIA_TYPE[media]
            if chosen == "dicom" and GSPS_PARAMETER in _pairs(parameters):
                chosen = "gsps"
        elif media in ("*/*", "application/*"):
            chosen, weight = "json", weight - 0.0001
        if chosen is not None:
            quality[chosen] = max(quality.get(chosen, 0.0), weight)
    if not quality or max(quality.values()) <= 0:
        raise ApiError(
            406,
            "not_acceptable",
            f"responses are {JSON}, {EVENTS} (the answer as it is written), {DICOM} (a Structured Report, or "
            f"with object=gsps a Presentation State), or {PNG} / {JPEG} (the image with the findings drawn)",
        )
    return max(quality, key=lambda kind: (quality[kind], kind == "json"))


def _pairs(parameters: list[str]) -> set[tuple[str, str]]:
    pairs = set()
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        pairs.add((name.strip().lower(), value.strip().strip('"').lower()))
    return pairs


def _quality(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(1.0, max(0.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0
