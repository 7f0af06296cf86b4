"""Which representation a client asked for with its Accept header: JSON, the answer streamed as
Server-Sent Events, a DICOM object, a FHIR bundle, or the image with the findings drawn.

The DICOM object is the media type's `object` parameter: none (or object=measurement-report) gives the TID
1500 Measurement Report, what IHE AI Results consumers read; object=basic-report the TID 2000 Basic
Diagnostic Imaging Report the service wrote before; object=gsps a Grayscale Softcopy Presentation State.
An object no task gives is not acceptable (406), never silently another.
"""

from __future__ import annotations

from typing import Literal

from app.api.errors import ApiError
from app.outputs.fhir import FHIR_JSON

DICOM = "application/dicom"
JSON = "application/json"
EVENTS = "text/event-stream"
PNG = "image/png"
JPEG = "image/jpeg"
OBJECT_PARAMETER = "object"

Representation = Literal[
    "json", "events", "measurement_report", "basic_report", "gsps", "fhir", "png", "jpeg"
]
_BY_MEDIA_TYPE: dict[str, Representation] = {
    JSON: "json",
    EVENTS: "events",
    DICOM: "measurement_report",
    FHIR_JSON: "fhir",
    PNG: "png",
    JPEG: "jpeg",
}
# application/dicom; object=...: the DICOM object each value names.
DICOM_OBJECTS: dict[str, Representation] = {
    "measurement-report": "measurement_report",
    "basic-report": "basic_report",
    "gsps": "gsps",
}
DICOM_ANSWERS: frozenset[Representation] = frozenset(DICOM_OBJECTS.values())
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
        if media == DICOM:
            asked = _pairs(parameters).get(OBJECT_PARAMETER, "measurement-report")
            chosen = DICOM_OBJECTS.get(asked)  # an object no task gives: not this entry
        elif media in _BY_MEDIA_TYPE:
            chosen = _BY_MEDIA_TYPE[media]
        elif media in ("*/*", "application/*"):
            chosen, weight = "json", weight - 0.0001
        if chosen is not None:
            quality[chosen] = max(quality.get(chosen, 0.0), weight)
    if not quality or max(quality.values()) <= 0:
        raise ApiError(
            406,
            "not_acceptable",
            f"responses are {JSON}, {EVENTS} (the answer as it is written), {DICOM} (a TID 1500 Measurement "
            "Report; object=basic-report: a TID 2000 Structured Report; object=gsps: a Presentation State), "
            f"{FHIR_JSON} (a FHIR R4 Bundle), or {PNG} / {JPEG} (the image with the findings drawn)",
        )
    return max(quality, key=lambda kind: (quality[kind], kind == "json"))


def _pairs(parameters: list[str]) -> dict[str, str]:
    pairs = {}
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        pairs[name.strip().lower()] = value.strip().strip('"').lower()
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
